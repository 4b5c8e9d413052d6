"""Torch-free runtime: face detection, landmarks, head pose and drawing for apps.

Imports only numpy, onnxruntime, OpenCV and flm's torch-free modules (spec, errors,
geometry, images, fileio, ui); a test proves it in a fresh interpreter.

    from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
    landmarker = FaceLandmarker.create("flm-68.onnx", FaceLandmarkerOptions(max_faces=4))
    for face in landmarker.detect(cv2.imread("photo.jpg")).faces:
        print(face.box, face.score, face.landmarks.shape, face.pose)
"""

from flm.runtime.detectors import (BoxAdjust, FaceDetector, HaarDetector, WholeImageDetector, YuNetDetector,
                                   box_iou, make_detector, nms)
from flm.runtime.draw import annotate, draw_box, draw_landmarks, draw_pose_axes, draw_sunglasses
from flm.runtime.landmarker import (Face, FaceLandmarker, FaceLandmarkerOptions, FaceLandmarkerResult,
                                    InvalidInputError)
from flm.runtime.pose import HeadPose, head_pose
from flm.runtime.smoothing import FaceTracker, OneEuroFilter

__all__ = [
    "FaceLandmarker", "FaceLandmarkerOptions", "FaceLandmarkerResult", "Face", "HeadPose", "InvalidInputError",
    "FaceDetector", "HaarDetector", "YuNetDetector", "WholeImageDetector", "BoxAdjust", "make_detector",
    "box_iou", "nms", "OneEuroFilter", "FaceTracker", "head_pose",
    "annotate", "draw_landmarks", "draw_box", "draw_pose_axes", "draw_sunglasses",
]
