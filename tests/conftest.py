import os

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tests.tiny import save_tiny_backbone  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads that spin-wait
    for busy cores slow small matmuls down by two orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A saved 4-layer random SmolLM3 (hidden 64) with a think-tag tokenizer: a local HF dir."""
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"), hidden_size=64)


@pytest.fixture(scope="session")
def tiny_backbone_dir_d32(tmp_path_factory):
    """Same as tiny_backbone_dir but hidden size 32, for mismatch tests."""
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone32"), hidden_size=32, seed=1)
