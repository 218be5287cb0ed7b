"""utils/preemption.py: stop requests (the signals themselves: test_training, test_multinode,
test_submitit_train); here, what happens where no signal handler can be installed."""
import threading

import torch

from utils.preemption import StopRequest, stop_requests


def test_a_stop_request_is_false_until_a_signal_names_itself():
    r = StopRequest()
    assert not r and r.name is None
    r.name = "SIGTERM"
    assert r


def test_training_through_the_api_in_a_worker_thread_installs_no_handler_and_saves(trained, tmp_path):
    """Python installs signal handlers in the main thread only: a detector fitted in a worker thread
    (a web server's, a notebook's executor) trains and saves with no stop request and no Ctrl-C hold."""
    import signal

    from dlsr.detector import DLSRDetector
    from experiment.config import load_config
    from store.checkpoint import load_checkpoint
    cfg = load_config(trained.config)
    cfg.output_dir, cfg.train.epochs = str(tmp_path / "threaded"), 2
    z = torch.randn(64, 512)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    outcome = []

    def work():
        try:
            with stop_requests() as request:
                outcome.append(bool(request))
            DLSRDetector(cfg, device="cpu").fit_features(z)
            outcome.append("fitted")
        except Exception as e:  # noqa: BLE001 - the test reports it
            outcome.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert outcome == [False, "fitted"]
    assert load_checkpoint(str(tmp_path / "threaded" / "checkpoint-last.pth")).epoch == 1
    assert {s: signal.getsignal(s) for s in handlers} == handlers
