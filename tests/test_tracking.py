"""tracking against a real MLflow server process and store: the REST API agrees with what the job printed; a server
that is unreachable at start or killed mid-run never stops training, and nothing is lost (local fallback store)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, run

MLFLOW = str(Path(sys.executable).parent / "mlflow")
EPOCHS = 4
RECIPE = ["--preset", "cpu-demo", "--width", "8", "--epochs", str(EPOCHS), "--batch-size", "100",
          "--warmup-epochs", "0.5", "--loader", "resident", "--system-metrics-interval", "1"]
SECRET = "s3cret-T0KEN"
EPOCH_LINE = re.compile(r"^epoch (\d+) \| .*? \| test ([\d.]+) %", re.M)


def start_server(store: Path):
    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)
    return {"url": url, "proc": proc, "store": f"sqlite:///{store}/mlflow.db"}


def stop_server(srv):
    try:
        os.killpg(srv["proc"].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    srv["proc"].wait()


@pytest.fixture
def server(tmp_path):
    srv = start_server(tmp_path / "server")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def served_run(synthetic_data, tmp_path_factory):
    """A real server and one short training job tracked on it, through a URL that carries credentials (the server
    has no authentication and ignores them; a real one behind a proxy would check them)."""
    work = tmp_path_factory.mktemp("served")
    srv = start_server(work / "server")
    try:
        uri = srv["url"].replace("http://", f"http://alice:{SECRET}@")
        p = run(train_cmd(synthetic_data, uri, "served-run"), cwd=work, check=True)
        srv["work"] = work
        yield srv, p
    finally:
        stop_server(srv)


def train_cmd(data_dir, uri, run_name="r"):
    return [sys.executable, "-m", "ddp_train", "--data-dir", data_dir, *RECIPE, "--tracking-uri", uri,
            "--experiment", "srv", "--run-name", run_name]


def rest(url, path, **query):
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}", timeout=10) as r:
        return json.load(r)


def runs_in(uri, experiment="srv"):
    from mlflow import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def test_rest_api_agrees_with_what_the_job_printed(served_run):
    server, p = served_run
    printed = {int(e): float(t) for e, t in EPOCH_LINE.findall(p.stdout)}
    assert sorted(printed) == list(range(EPOCHS))
    exp = rest(server["url"], "experiments/get-by-name", experiment_name="srv")["experiment"]
    req = urllib.request.Request(f"{server['url']}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                 headers={"Content-Type": "application/json"})
    [found] = json.load(urllib.request.urlopen(req, timeout=10))["runs"]
    assert found["info"]["status"] == "FINISHED" and found["info"]["run_name"] == "served-run"
    hist = rest(server["url"], "metrics/get-history", run_id=found["info"]["run_id"], metric_key="test_top1")
    assert {m["step"]: round(m["value"], 2) for m in hist["metrics"]} == printed
    assert "unreachable" not in p.stdout


def test_credentials_in_the_tracking_uri_are_stored_and_shown_nowhere(served_run):
    """Params, tags, the job's output, the printed config, checkpoints, the final model, the run directory and the
    server's whole store (database and artifacts) hold the URL only as http://***@…."""
    server, p = served_run
    _, [r] = runs_in(server["store"])
    assert r.data.params["tracking_uri"] == f"http://***@{server['url'][7:]}"
    assert SECRET not in p.stdout + p.stderr and "***@" in p.stdout
    assert SECRET not in json.dumps([r.data.params, r.data.tags])
    places = [server["work"] / "runs", server["work"] / "server"]
    stored = [f for place in places for f in place.rglob("*") if f.is_file()]
    assert any(f.name.startswith("ckpt_") for f in stored) and any(f.name == "model.pt" for f in stored)
    assert any(f.suffix == ".db" for f in stored) and any(f.name == "MLmodel" for f in stored)
    leaks = [str(f) for f in stored if SECRET.encode() in f.read_bytes()]
    assert not leaks


def test_unreachable_server_at_start_falls_back_locally_and_training_finishes(synthetic_data, tmp_path):
    """Also: MLflow's error names the whole URL, and the warnings printed its credentials with it."""
    t0 = time.monotonic()
    p = run(train_cmd(synthetic_data, f"http://alice:{SECRET}@127.0.0.1:{free_port()}"), cwd=tmp_path, check=True)
    assert time.monotonic() - t0 < 300
    assert SECRET not in p.stdout + p.stderr and "http://***@127.0.0.1" in p.stdout
    fallback = tmp_path / "runs" / "r" / "mlflow-fallback.db"
    assert "unreachable" in p.stdout and str(fallback) in p.stdout and "the complete run is" in p.stdout
    c, [r] = runs_in(f"sqlite:///{fallback}")
    assert r.info.status == "FINISHED" and r.data.params["epochs"] == str(EPOCHS)
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "test_top1")) == list(range(EPOCHS))


def test_server_killed_mid_run_loses_nothing_and_a_resume_continues_the_servers_run(server, synthetic_data,
                                                                                     tmp_path):
    """The server dies after epoch 0: the job goes on in the local fallback store, epoch 0 replayed there. A
    preemption (SIGTERM) stops it after epoch 1; resumed once the server is back (same store), it continues the
    server's run and logs the epoch the server missed. (The checkpoints used to name the fallback run, which the
    server does not know: the resume started a second run there and left the first one RUNNING.)"""
    proc = subprocess.Popen(train_cmd(synthetic_data, server["url"]), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("epoch 0 |"):
            os.killpg(server["proc"].pid, signal.SIGKILL)  # the server dies after epoch 0 was logged
        if line.startswith("epoch 1 |"):
            proc.send_signal(signal.SIGTERM)
            break
    rest_out, _ = proc.communicate(timeout=600)
    stdout = "".join(out) + rest_out
    assert proc.returncode == 3, stdout[-3000:]
    printed = {int(e): float(t) for e, t in EPOCH_LINE.findall(stdout)}
    assert sorted(printed) == [0, 1]
    # the server's store kept what it received before it died
    c, [on_server] = runs_in(server["store"])
    assert [m.step for m in c.get_metric_history(on_server.info.run_id, "test_top1")] == [0]
    # the fallback store has the attempt's whole run, epoch 0 replayed
    fallback = tmp_path / "runs" / "r" / "mlflow-fallback.db"
    assert "unreachable" in stdout and str(fallback) in stdout
    c, [r] = runs_in(f"sqlite:///{fallback}")
    assert r.info.status == "KILLED" and on_server.info.run_id in r.data.tags["fallback_from"]
    hist = {m.step: round(m.value, 2) for m in c.get_metric_history(r.info.run_id, "test_top1")}
    assert hist == printed
    back = start_server(Path(server["store"][len("sqlite:///"):]).parent)
    try:
        p = run(train_cmd(synthetic_data, back["url"]), cwd=tmp_path, check=True)
        printed.update({int(e): float(t) for e, t in EPOCH_LINE.findall(p.stdout)})
        c, [again] = runs_in(back["store"])
        assert again.info.run_id == on_server.info.run_id and again.info.status == "FINISHED"
        hist = {m.step: round(m.value, 2) for m in c.get_metric_history(again.info.run_id, "test_top1")}
        assert hist == printed and sorted(hist) == list(range(EPOCHS))
    finally:
        stop_server(back)


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, driven by Playwright (its own browser download cannot work offline)."""
    path = Path("/usr/bin/chromium")
    if not path.exists():
        if os.geteuid() != 0:
            pytest.skip("Chromium is missing and installing it needs root: apt-get install chromium")
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
            env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
        if not path.exists():
            run(["apt-get", "update", "-qq"], timeout=600)
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                env={"DEBIAN_FRONTEND": "noninteractive"}, check=True, timeout=900)
    return str(path)


def test_ui_lists_the_run_and_renders_its_metric_charts(served_run, chromium, tmp_path):
    from playwright.sync_api import sync_playwright
    server, _ = served_run
    exp_id = rest(server["url"], "experiments/get-by-name", experiment_name="srv")["experiment"]["experiment_id"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{server['url']}/#/experiments/{exp_id}?workflowType=machine_learning")
            link = page.get_by_role("link", name="served-run")
            link.first.wait_for(timeout=60_000)                        # the runs table lists the run
            # its Dataset and Source columns are filled from the run's dataset inputs and MLflow's system tags
            page.get_by_text("synthetic CIFAR-100 train (").first.wait_for(timeout=30_000)
            table = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "runs.png"))
            link.first.click()
            page.get_by_text("Trained by").first.wait_for(timeout=30_000)  # the run's overview and description
            overview = page.inner_text("body")
            page.get_by_role("tab", name="Model metrics").click()
            page.wait_for_selector("svg.main-svg", timeout=60_000)     # plotly charts rendered
            charts = page.locator("svg.main-svg").count()
            page.screenshot(path=str(tmp_path / "charts.png"))
            page.get_by_placeholder("Search metric charts").fill("test_top1")  # charts below the fold are lazy
            page.get_by_text("served-run (test_top1)").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "test_top1.png"))
        finally:
            browser.close()
    header = table[table.index("Run Name"):]
    assert header.index("Dataset") < header.index("Source") and "python -m ddp_train" in header
    assert "synthetic CIFAR-100 test (" in header and "Training" in header and "Testing" in header
    assert "Trained by python -m ddp_train" in overview and "--run-name served-run" in overview  # description
    assert "synthetic CIFAR-100 train (" in overview[overview.index("Datasets"):]
    assert charts >= 4
    for shot in ("runs.png", "charts.png", "test_top1.png"):
        assert (tmp_path / shot).read_bytes()[:4] == b"\x89PNG"


def test_logging_the_model_leaves_the_run_running_until_the_job_ends_it(tmp_path, monkeypatch):
    """mlflow.pytorch.log_model needs an active run, and leaving start_run's block ends it FINISHED: a rank 0 killed
    between the export and its last words left a FINISHED run that no survivor could mark FAILED."""
    import torch
    from mlflow import MlflowClient

    from ddp_train import data
    from ddp_train.models import build_model
    from ddp_train.tracking import Tracker, mark_failed
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(True, uri, "unit", fallback_dir=tmp_path)
    t.start("r", {"width": 8}, {})
    example = data.normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).numpy()
    t.log_model(build_model("resnet18", 100, 8, "bn").eval(), example)
    c = MlflowClient(uri)
    assert t.errors == 0 and c.get_run(t.run_id).info.status == "RUNNING"
    assert [m.name for m in c.search_logged_models([c.get_experiment_by_name("unit").experiment_id])] == ["model"]
    mark_failed(t.run_id, uri)  # what a survivor does when rank 0 dies now
    assert c.get_run(t.run_id).info.status == "FAILED"



def test_a_server_uri_in_capitals_is_a_server_that_fails_over(tmp_path, monkeypatch):
    """MLflow reads HTTP:// as a server; the tracker did not, so it neither cut MLflow's retries nor fell back."""
    from ddp_train.tracking import Tracker
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(var, "")  # recorded, so that monkeypatch restores it (an absent one is not)
        monkeypatch.delenv(var)  # the Tracker sets them for its process
    t = Tracker(True, f"HTTP://127.0.0.1:{free_port()}", "e", fallback_dir=tmp_path, log=lambda *a, **k: None)
    assert t.remote and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    t.start("r", {"lr": 0.1}, {})  # nothing listens there
    assert t.fallback and t.fallback[1] == f"sqlite:///{tmp_path}/mlflow-fallback.db" and t.run_id
    t.finish("FINISHED")


def test_mlflows_own_log_lines_hide_credentials(tmp_path, capfd):
    """MLflow's system-metrics thread logs "Failed to get mlflow run: API request to <URL> failed" when a server
    goes away mid-run: with the URL's credentials."""
    import logging

    from ddp_train.tracking import Tracker
    Tracker(True, f"sqlite:///{tmp_path}/mlflow.db", "e", fallback_dir=tmp_path)
    capfd.readouterr()
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").warning(
        "Failed to get mlflow run: API request to %s failed", f"http://alice:{SECRET}@h:5000/api/2.0/mlflow/runs/get")
    err = capfd.readouterr().err
    assert "API request to http://***@h:5000/api/2.0/mlflow/runs/get failed" in err and SECRET not in err, err


def test_the_tags_of_a_user_without_a_passwd_entry(tmp_path):
    """docker run --user UID, a Kubernetes runAsUser: no passwd entry and no USER. getpass.getuser() raised and
    every run failed as it started, --no-mlflow too (the tags are built on every rank)."""
    import pwd

    import torch

    from ddp_train import run_info
    uid = next(u for u in range(54321, 60000) if not any(p.pw_uid == u for p in pwd.getpwall()))
    read, write = os.pipe()
    pid = os.fork()  # the child becomes that user (this interpreter: the venv's python may not be its to run)
    if pid == 0:
        try:
            for var in ("USER", "LOGNAME", "LNAME", "USERNAME"):
                os.environ.pop(var, None)
            os.setgid(uid)
            os.setuid(uid)
            said = run_info.tags(1, torch.device("cpu"), "sha", {"source": "synthetic"}, tmp_path)["mlflow.user"]
        except BaseException as e:
            said = f"{type(e).__name__}: {e}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1000).decode() == f"uid {uid}"


def test_a_continued_run_says_the_experiment_it_is_in_and_holds_each_step_metric_once(tmp_path):
    """A resume with another --experiment printed 'run … in experiment <asked>' for a run that stays where it is;
    an attempt that crashed mid-epoch and resumed from the epoch's start logged its step metrics a second time."""
    from mlflow import MlflowClient

    from ddp_train.tracking import Tracker
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker(True, uri, "a", fallback_dir=tmp_path, log=lambda *a, **k: None)
    first.start("r", {"lr": 0.1}, {})
    for step in (5, 10, 15):  # then the process dies (no finish): the resume starts again at step 10
        first.log_steps({"step_train_loss": 1.0 / step}, step)
    __import__("mlflow").flush_async_logging()
    said = []
    again = Tracker(True, uri, "b", fallback_dir=tmp_path, log=said.append)
    again.start("r", {"lr": 0.1}, {}, resume_run_id=first.run_id)
    for step in (15, 20):
        again.log_steps({"step_train_loss": 1.0 / step}, step)
    again.finish("FINISHED")
    assert said == [f"note: run {first.run_id} is in experiment 'a', not 'b' as this attempt asks: a continued run "
                    "stays in its experiment", f"MLflow: run {first.run_id} in experiment 'a' at {uri} (continued)"]
    steps = [m.step for m in MlflowClient(uri).get_metric_history(first.run_id, "step_train_loss")]
    assert sorted(steps) == [5, 10, 15, 20]


def test_a_deleted_experiment_moves_the_run_to_the_fallback_store_with_the_way_back(tmp_path):
    """An experiment deleted in the UI and named again: MLflow refused the run and the job trained untracked, with
    MLflow's own message. Now the run goes to the fallback store, and the warning says how to restore the
    experiment."""
    from mlflow import MlflowClient

    from ddp_train.tracking import Tracker
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    gone = c.create_experiment("gone")
    c.delete_experiment(gone)
    said = []
    t = Tracker(True, uri, "gone", fallback_dir=tmp_path, log=said.append)
    t.start("r", {"lr": 0.1}, {})
    t.log_epoch({"test_top1": 1.0}, 0)
    t.finish("FINISHED")
    fallback = f"sqlite:///{tmp_path}/mlflow-fallback.db"
    assert t.errors == 0 and t.fallback[1] == fallback
    assert said[0].startswith(f"warning: MLflow tracking URI {uri} unusable (DeletedExperiment: experiment 'gone' is "
                              f"deleted there: restore it (mlflow experiments restore --experiment-id {gone}) or pass "
                              f"another --experiment); the run continues in the local store {fallback}"), said
    assert said[-1].startswith(f"MLflow: the tracking URI {uri} could not be used (DeletedExperiment:"), said
    run = MlflowClient(fallback).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"test_top1": 1.0} and run.data.params == {"lr": "0.1"}
    assert c.search_runs([gone], run_view_type=3) == []  # nothing in the deleted experiment


def test_a_continued_run_that_fails_over_takes_its_earlier_epochs_and_datasets_along(synthetic_data, tmp_path):
    """A resumed job continues the server's run without logging its earlier epochs again; when the server then
    died, the fallback run got only the epochs after the resume, and no dataset inputs. Here the job resumes from
    the checkpoint of epoch 1 while the run holds epochs 0 and 1 (killed between logging epoch 1 and its
    checkpoint): epoch 1 is trained again, and the server dies during it."""
    from mlflow import MlflowClient

    from data_prep.manifest import manifest_checksum, verify
    from ddp_train import run_info
    from ddp_train.tracking import Tracker
    manifest = verify(synthetic_data)
    inputs = lambda: run_info.datasets(manifest, manifest_checksum(synthetic_data))  # noqa: E731
    quiet = lambda *a, **k: None  # noqa: E731
    srv = start_server(tmp_path / "server")
    try:
        first = Tracker(True, srv["url"], "e", fallback_dir=tmp_path, log=quiet)
        first.start("r", {"lr": 0.1}, {})
        first.log_inputs(inputs)
        for epoch in (0, 1):
            first.log_epoch({"test_top1": 10.0 + epoch}, epoch)
        first.finish("KILLED")
        again = Tracker(True, srv["url"], "e", fallback_dir=tmp_path, log=quiet)
        again.start("r", {"lr": 0.1}, {}, resume_run_id=first.run_id)
        again.log_inputs(inputs)
        again.log_epoch({"test_top1": 10.0}, 0)  # the trainer passes its history on; the run holds it
        assert again.continued
    finally:
        stop_server(srv)
    again.log_metrics({"probe": 1.0})  # the server is gone: the first call moves the run to the fallback store
    for epoch, top1 in [(1, 11.5), (2, 12.0)]:  # epoch 1 again, then a new one
        again.log_epoch({"test_top1": top1}, epoch)
    again.finish("FINISHED")
    c = MlflowClient(again.fallback[1])
    assert [(m.step, m.value) for m in c.get_metric_history(again.run_id, "test_top1")] == [
        (0, 10.0), (1, 11.5), (2, 12.0)]
    assert len(c.get_run(again.run_id).inputs.dataset_inputs) == 2
