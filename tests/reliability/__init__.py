"""Reliability suite (issue 7): bad input, crashes and hostile files never lose work or give
wrong numbers. Part of the default test run; `just fuzz` reruns every property test (these and
tests/test_data_formats.py's) with thousands of examples (HYPOTHESIS_PROFILE=fuzz, tests/conftest.py).

Where each bullet of the issue is proven. Tests elsewhere in tests/ are referenced, not repeated.

Loaders
  every format x missing / empty / bomb-header image, NaN / inf / far-out / missing point
                                      test_loaders::test_every_format_refuses_then_skips_each_bad_input
  truncated JPEG / PNG, garbage image tests/test_data_formats.py::test_truncated_and_garbage_images_fail_on_load_naming_the_image
  wrong coordinate count, NaN/inf/negative/out-of-image, not a number, collapsed
                                      tests/test_data_formats.py::test_udacity_bad_row_names_file_and_line (+ per-format tests there)
  duplicate rows                      tests/test_data_formats.py::test_udacity_bad_image_or_duplicate_names_csv_line_and_image,
                                      ::test_wflw_malformed_names_file_and_line, ::test_ibug_xml_record_errors_name_the_line_and_can_be_skipped
  non-UTF-8 names, BOM, spaces        tests/test_data_formats.py::test_udacity_non_utf8_file_names_the_line_even_with_skip_bad,
                                      ::test_udacity_utf8_names_and_bom_are_fine, ::test_udacity_reads_points_identity_and_lines
  gray / BGRA / 16-bit / palette      tests/test_data_formats.py::test_load_image_gray_bgra_16bit_and_palette
  20,000 x 20,000 image (real PNG)    tests/test_data_formats.py::test_decompression_bomb_refused_without_allocating
  --skip-bad: how many and why        flm data check: tests/test_data_cli.py::test_check_reports_every_bad_row_and_fails;
                                      flm train: test_loaders::test_train_stops_on_a_bad_sample_or_skips_and_reports_with_skip_bad
  property tests                      Udacity / .pts / dlib XML / WFLW: tests/test_data_formats.py (fuzz);
                                      FaceSynthetics, AFLW2000 .mat, image bytes, arrays, point checks,
                                      FORMAT:PATH names, spec JSON: test_loaders::test_*_garbage_* / ::test_*_or_raise*
Training
  SIGINT / SIGTERM -> resumable last.pt, exit 130
                                      test_interrupts::test_a_signal_saves_a_resumable_checkpoint_and_exits_130
  --resume after a signal mid-epoch = uninterrupted run (metrics and weights)
                                      test_interrupts::test_resuming_after_a_signal_mid_epoch_gives_the_uninterrupted_metrics
                                      (+ ::test_negative_control_a_resume_from_another_step_does_not_match);
                                      at an epoch boundary: tests/test_training.py::test_resume_after_one_epoch_matches_exactly
  SIGKILL mid-write never tears best.pt / last.pt
                                      test_interrupts::test_sigkill_in_the_middle_of_writes_never_leaves_a_torn_checkpoint
  NaN / inf loss names the step, keeps the last good checkpoint
                                      tests/test_training.py::test_nan_loss_stops_with_the_step_named;
                                      test_interrupts::test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint,
                                      ::test_nan_weights_are_never_saved_as_the_last_good_checkpoint,
                                      ::test_nan_at_the_first_step_does_not_claim_a_checkpoint_that_does_not_exist
  full disk                           test_interrupts::test_a_full_disk_is_a_clear_error_and_the_old_file_stays (/dev/full),
                                      ::test_flm_train_on_a_full_filesystem_is_one_clear_error (16 MB tmpfs)
Model files
  torch.load(weights_only=True): code never runs
                                      test_model_files::test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs
                                      (+ tests/test_training.py::test_checkpoint_refuses_foreign_and_truncated_files)
  checkpoint: wrong point count, no spec, bad spec, foreign, empty
                                      test_model_files::test_checkpoints_that_are_not_usable_are_refused_with_the_reason
  ONNX / Core ML truncated, foreign, spec-less
                                      tests/test_parity.py::test_truncated_and_foreign_onnx_files_give_clear_errors,
                                      ::test_truncated_and_foreign_coreml_packages_give_clear_errors,
                                      tests/test_runtime.py::test_model_files_without_a_valid_spec_are_refused (also 68 vs 98 points);
                                      mangled bytes: test_model_files::test_model_file_readers_never_crash_on_mangled_bytes
  runtime: output with the wrong point count (dynamic shapes)
                                      test_model_files::test_runtime_refuses_a_model_whose_answer_has_the_wrong_point_count
  ONNX external data outside the model's folder
                                      budgets: tests/test_budgets.py::test_onnx_external_data_escaping_the_folder_is_refused;
                                      runtime: test_model_files::test_runtime_refuses_onnx_external_data_outside_the_models_folder
Runtime
  empty / 1x1 / NaN images            tests/test_runtime.py::test_bad_images_raise_or_give_empty_results;
                                      test_runtime_inputs::test_unusable_images_raise_a_typed_error, ::test_tiny_and_odd_but_valid_images
  huge (8000 x 8000), all-black       test_runtime_inputs::test_huge_black_image_is_handled_in_bounded_time,
                                      ::test_all_black_and_all_white_images
  8 threads for seconds = sequential  test_runtime_inputs::test_eight_threads_on_one_landmarker_for_seconds_match_sequential
                                      (+ tests/test_runtime.py::test_one_landmarker_from_eight_threads_matches_sequential)
  no memory growth, 10,000 calls      test_runtime_inputs::test_no_memory_growth_over_ten_thousand_calls
CLI
  user errors: one line + example, no traceback; --debug shows it
                                      test_cli_errors::test_user_error_is_one_line_with_an_example, ::test_debug_shows_the_traceback
"""
