"""Fixtures of the evaluation tests: an initialised mla_tiny HF checkpoint, a passkey config, a real vLLM server."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mla_components.checkpointing.init import write_initial_checkpoint
from tests._requirements import unavailable
from tests.eval.vllm_server import VLLM_READY, serve_vllm

REPO = Path(__file__).resolve().parents[2]
PASSKEY_CONFIG = REPO / "configs" / "mla_tiny" / "passkey_eval.yaml"
# The small grid of the CI tests: 2 lengths x 2 depths x 2 trials, contexts <= 512 tokens.
SMALL_GRID = {"context_lengths": [400, 512], "depths": [0.0, 1.0], "trials_per_cell": 2, "max_new_tokens": 8}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised mla_tiny written as an HF DeepseekV3 directory with the byte tokenizer."""
    return write_initial_checkpoint("mla_tiny", tmp_path_factory.mktemp("eval_ckpt") / "mla_tiny_init", seed=0)


@pytest.fixture
def passkey_cfg(tiny_checkpoint, tmp_path):
    """The shipped mla_tiny passkey config pointed at the tiny checkpoint and a temporary output_dir."""
    cfg = OmegaConf.load(PASSKEY_CONFIG)
    cfg.checkpointer.checkpoint_dir = str(tiny_checkpoint)
    cfg.output_dir = str(tmp_path / "passkey")
    cfg.progress = False
    for key, value in SMALL_GRID.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def vllm_base_url(tiny_checkpoint, tmp_path_factory):
    """``vllm serve`` of the tiny checkpoint (junk answers: the judge's malformed-output path), one per session."""
    if not VLLM_READY.exists():
        unavailable(f"vLLM is not installed ({VLLM_READY} missing; run `make serve-setup`)")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with serve_vllm(tiny_checkpoint, served_name="tiny-judge", log_path=log) as base_url:
        yield base_url
