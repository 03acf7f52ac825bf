import locale
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


# The suite runs on two pytest-xdist workers (`make test`: -n 2 --dist loadfile --no-loadscope-reorder): each
# worker takes whole modules, so a module's fixtures (a trained network, the shared tiny run of test_tiny_run.py)
# are built once. Modules are handed out in collection order: those with end-to-end snakemake runs (the
# `workflow` marker) first, so the long ones start at once and the short unit modules fill in behind them.


def pytest_collection_modifyitems(items):
    end_to_end = {item.module.__name__ for item in items if item.get_closest_marker("workflow")}
    items.sort(key=lambda item: item.module.__name__ not in end_to_end)  # stable: each module keeps its order


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread, and do not slow to a crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def process_locale_restored():
    """ITK's DICOM code (GDCM), in tests that write or read DICOM, can leave the process locale at "C";
    every later test in this process would then open text files as ASCII. Each test starts as the run did."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)
