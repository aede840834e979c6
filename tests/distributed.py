"""Multi-rank tests fork their ranks from this already-imported pytest process: see lomo_trainer.local_ranks.

A test that forks ranks must carry ``@pytest.mark.multirank`` (the fast lane, ``-m "not multirank and not slow"``,
leaves it out): ``run_ranks`` refuses to run in a test without the mark, so a missing mark fails at once."""
from lomo_trainer.local_ranks import run_ranks as _run_ranks

__all__ = ["run_ranks"]
marked_multirank = True  # set per test by conftest.py from the test's marks


def run_ranks(*args, **kwargs):
    if not marked_multirank:
        raise RuntimeError("this test forks ranks: mark it @pytest.mark.multirank")
    return _run_ranks(*args, **kwargs)
