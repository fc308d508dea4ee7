"""Shared test set-up: offline tokenizer files and loopback helpers."""

from __future__ import annotations

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken"

# Tests and CI run offline: encodings come from ../shared/tiktoken beside the checkout.
if "SIDECAR_TOKENIZER_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
    os.environ["SIDECAR_TOKENIZER_DIR"] = str(SHARED_TIKTOKEN)
