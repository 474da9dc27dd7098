"""models.py: the attention implementation `auto` picks. Each kernel on packed rows: tests/test_speed_paths.py.

    pytest -q tests/test_models.py
"""

from __future__ import annotations

import pytest
import torch

from evertrain import models


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA only")
def test_auto_attention_is_sdpa_without_cuda():
    assert models.attention_implementation("auto") == "sdpa"
    assert models.attention_implementation("eager") == "eager"
