"""Imported by each SDK worker process at its start (`--beam_plugin`, added by
beam_infer.io.gcs_env.prepare_storage_emulator): with STORAGE_EMULATOR_HOST set there, readies the process for the
emulator (no wait on Google credentials). Importing beam_infer itself has no such effect."""

import os

from beam_infer.io import gcs_env

if os.environ.get(gcs_env.EMULATOR_HOST):
    gcs_env.prepare_process()
