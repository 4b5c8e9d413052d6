"""Head pose (yaw, pitch, roll) from 68 landmarks with `cv2.solvePnP` and a 3-D mean face.

The 3-D face is a small table of rigid points of an average adult head (millimetres, origin
at the nose tip, x to the subject's left = image right for a frontal face, y down, z away
from the camera), the classic 6-point model used with OpenCV extended by the nasion, the
inner eye corners and the base of the nose. The camera is a pinhole with focal length equal
to the image's longer side and its centre at the image centre — good enough for angles.

Sign conventions (degrees), as seen in the image:
- yaw > 0: the face turns towards the image's right (the nose moves right);
- pitch > 0: the face tilts up (the nose moves up);
- roll > 0: the face rotates counter-clockwise on screen (the same sense as
  `flm.geometry.crop_matrix`'s `angle_deg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# ibug68 index -> 3-D point (mm); y down, z away from the camera, nose tip at the origin
MEAN_FACE_68: dict[int, tuple[float, float, float]] = {
    30: (0.0, 0.0, 0.0),  # nose tip
    8: (0.0, 66.0, 13.0),  # chin
    36: (-45.0, -34.0, 27.0),  # outer eye corners
    45: (45.0, -34.0, 27.0),
    39: (-14.0, -33.0, 24.0),  # inner eye corners
    42: (14.0, -33.0, 24.0),
    27: (0.0, -38.0, 22.0),  # nasion (top of the nose bridge)
    33: (0.0, 10.0, 12.0),  # base of the nose
    48: (-30.0, 30.0, 25.0),  # mouth corners
    54: (30.0, 30.0, 25.0),
}
POSE_INDEX = np.array(sorted(MEAN_FACE_68))
POSE_MODEL = np.array([MEAN_FACE_68[i] for i in POSE_INDEX], np.float64)


@dataclass(frozen=True)
class HeadPose:
    """Angles in degrees (see the module docstring for the signs) plus what drawing needs.

    Iterating gives (yaw, pitch, roll), so `yaw, pitch, roll = face.pose` works.
    """

    yaw: float
    pitch: float
    roll: float
    rvec: np.ndarray  # Rodrigues rotation, 3-D face -> camera
    tvec: np.ndarray  # translation (mm)
    camera: np.ndarray  # 3x3 intrinsics used

    def __iter__(self):
        return iter((self.yaw, self.pitch, self.roll))

    def as_dict(self) -> dict:
        return {"yaw": round(self.yaw, 2), "pitch": round(self.pitch, 2), "roll": round(self.roll, 2)}


def camera_matrix(image_shape) -> np.ndarray:
    h, w = image_shape[:2]
    f = float(max(h, w))
    return np.array([[f, 0, (w - 1) / 2.0], [0, f, (h - 1) / 2.0], [0, 0, 1]], np.float64)


def euler_from_rotation(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees with flm's signs, for R = Rz(-roll) Ry(-yaw) Rx(-pitch)."""
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    # in OpenCV's frame (y down) a positive rotation about y moves the nose left and a positive
    # rotation about x moves it down; about z it turns clockwise on screen: flip all three
    return -yaw, -pitch, -roll


def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Inverse of `euler_from_rotation` (for tests and synthetic faces)."""
    y, p, r = (math.radians(-v) for v in (yaw, pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_pose(landmarks: np.ndarray, image_shape) -> HeadPose | None:
    """Head pose from (68, 2) image-pixel landmarks; None if the points are unusable."""
    pts = np.asarray(landmarks, np.float64)
    if pts.shape != (68, 2):
        raise ValueError(f"head_pose needs 68 points (ibug68), got shape {pts.shape}")
    img_pts = pts[POSE_INDEX]
    if not np.isfinite(img_pts).all():
        return None
    cam = camera_matrix(image_shape)
    # start from a frontal face at the distance its eye spacing implies: ITERATIVE then
    # converges to the near solution instead of a mirrored one behind the camera
    eye = np.linalg.norm(img_pts[list(POSE_INDEX).index(36)] - img_pts[list(POSE_INDEX).index(45)])
    z = cam[0, 0] * 90.0 / max(eye, 1e-6)
    centre = img_pts[list(POSE_INDEX).index(30)]
    t0 = np.array([(centre[0] - cam[0, 2]) * z / cam[0, 0], (centre[1] - cam[1, 2]) * z / cam[1, 1], z])
    ok, rvec, tvec = cv2.solvePnP(POSE_MODEL, img_pts, cam, None, rvec=np.zeros((3, 1)), tvec=t0.reshape(3, 1),
                                  useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or not np.isfinite(rvec).all() or tvec[2, 0] <= 0:
        return None
    r, _ = cv2.Rodrigues(rvec)
    yaw, pitch, roll = euler_from_rotation(r)
    return HeadPose(yaw, pitch, roll, rvec.reshape(3), tvec.reshape(3), cam)


def project_face(pose_rotation: np.ndarray, tvec, image_shape, points3d=None) -> np.ndarray:
    """Project 3-D face points (default: the pose model) into the image (tests, drawing)."""
    pts = POSE_MODEL if points3d is None else np.asarray(points3d, np.float64)
    rvec, _ = cv2.Rodrigues(np.asarray(pose_rotation, np.float64))
    out, _ = cv2.projectPoints(pts, rvec, np.asarray(tvec, np.float64).reshape(3, 1), camera_matrix(image_shape), None)
    return out.reshape(-1, 2)
