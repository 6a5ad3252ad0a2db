"""The framework integrations (runwatch/integrations/), each through the framework's own training loop on a
tiny model and data the test makes (nothing downloaded; CPU), against the real embedded stack: every logged
name and value as stored, the last step, the hyperparameters, and the run's final status, a training that
raises included. The frameworks are installed by `./dev test` (tests/frameworks.txt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import unique_name, wait_until

from runwatch import Experiment, Run, ScriptRunConfig, Workspace


def train(code: str, tmp_path, timeout: float = 300, **env: str) -> dict:
    """Run a training script in its own process (as a user's script is); it prints one JSON line last."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(code))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def stored(run_id: str, status: str = "Completed") -> Run:
    run = Run.get(Workspace.from_config(), run_id)
    wait_until(lambda: run.get_status() == status, 60, what=f"run {run_id} {status}")
    return run


def last_steps(stack_env, run_id: str) -> dict[str, int]:
    aggs = stack_env.get(f"/api/runs/{run_id}/aggregates")
    return {k: v["last_step"] for k, v in aggs.items()}


# ------------------------------------------------------------------------------ Lightning
LIGHTNING = """
    import json, sys, torch
    import lightning.pytorch as pl
    from runwatch.integrations.lightning import RunwatchLogger

    torch.manual_seed(0)
    FAIL = len(sys.argv) > 1

    class Tiny(pl.LightningModule):
        def __init__(self, lr=0.1, hidden=4, extra={"nested": {"depth": 2}, "odd": object()}):
            super().__init__()
            self.save_hyperparameters(ignore=["extra"])
            self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
            self.seen = []

        def training_step(self, batch, i):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if FAIL and self.global_step == 3:
                raise RuntimeError("the loss exploded")
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            self.seen.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    x = torch.randn(64, 3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    logger = RunwatchLogger(experiment_name=EXPERIMENT)
    logger.log_hyperparams({"batch_size": 8, "schedule": {"kind": "constant", "odd": object()}})
    model = Tiny()
    trainer = pl.Trainer(max_epochs=2, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, data)
    print(json.dumps({"run": logger.experiment.id, "losses": model.seen, "steps": trainer.global_step}))
"""


def test_lightning_logger(stack_env, tmp_path):
    exp = unique_name("lightning")
    out = train(LIGHTNING.replace("EXPERIMENT", repr(exp)), tmp_path)
    run = stored(out["run"])
    m = run.get_metrics()
    assert m["train_loss"] == pytest.approx(out["losses"], rel=1e-6) and len(out["losses"]) == 16
    assert last_steps(stack_env, run.id)["train_loss"] == out["steps"] - 1
    props = run.get_properties()
    assert props["lr"] == "0.1" and props["hidden"] == "4" and props["batch_size"] == "8"
    assert props["schedule.kind"] == "constant" and props["schedule.odd"].startswith("<object object")
    assert run.experiment.name == exp


def test_lightning_logger_fails_the_run_when_fit_raises(stack_env, tmp_path):
    exp = unique_name("lightning-fail")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(LIGHTNING.replace("EXPERIMENT", repr(exp))), "fail"],
                         cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "the loss exploded" in out.stderr
    runs = Experiment(Workspace.from_config(), exp).get_runs()
    assert len(runs) == 1
    run = stored(runs[0].id, "Failed")
    assert len(run.get_metrics()["train_loss"]) == 3
    assert "failed" in json.dumps(run.get_details()["error"])


DDP = """
    import os, torch
    import lightning.pytorch as pl
    from runwatch.integrations.lightning import RunwatchLogger

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)

        def training_step(self, batch, i):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(int(os.environ["RANK"]))
    x = torch.randn(64, 3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, logger=RunwatchLogger(), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2,
                         strategy="ddp", use_distributed_sampler=True)
    trainer.fit(Tiny(), data)
    print("rank", os.environ["RANK"], "done", flush=True)
"""


def test_lightning_ddp_on_two_processes_gives_one_child_run_per_rank(stack_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text(textwrap.dedent(DDP))
    run = Experiment(Workspace.from_config(), unique_name("ddp")).submit(
        ScriptRunConfig(source_directory=str(src), script="train.py", process_count_per_node=2))
    details = run.wait_for_completion(timeout=300, raise_on_error=False)
    assert details["status"] == "Completed", run.get_details_with_logs()["logFiles"]
    kids = sorted(run.get_children(), key=lambda k: k.id)
    assert [k.id for k in kids] == [f"{run.id}_rank0", f"{run.id}_rank1"]
    for k in kids:
        assert k.get_status() == "Completed" and k.get_tags()["rank"] in ("0", "1")
        assert len(k.get_metrics()["train_loss"]) == 4  # 64 samples, 2 ranks, batches of 8: 4 steps each
    assert kids[0].get_metrics()["train_loss"] != kids[1].get_metrics()["train_loss"], "each rank its own loss"


# ------------------------------------------------------------------------------ Hugging Face
HF = """
    import json, sys, torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, TrainerCallback
    from runwatch.integrations.huggingface import RunwatchCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=16, num_labels=2))

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(1, 64, (8,), generator=g), "labels": torch.tensor(i % 2)}

    class Explode(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if len(sys.argv) > 1 and state.global_step == 2:
                raise RuntimeError("out of memory (pretend)")

    cb = RunwatchCallback(experiment_name=EXPERIMENT)
    args = TrainingArguments(output_dir="out", report_to=[], logging_steps=1, num_train_epochs=2, learning_rate=0.01,
                             per_device_train_batch_size=8, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[cb, Explode()])
    print("RUN", cb.run.id, flush=True)
    trainer.train()
    print(json.dumps({"run": cb.run.id, "history": trainer.state.log_history, "steps": trainer.state.global_step}))
"""


def test_huggingface_callback(stack_env, tmp_path):
    exp = unique_name("hf")
    out = train(HF.replace("EXPERIMENT", repr(exp)), tmp_path, HF_HUB_OFFLINE="1")
    run = stored(out["run"])
    m = run.get_metrics()
    logged = [h for h in out["history"] if "loss" in h]
    assert m["loss"] == [h["loss"] for h in logged] and len(logged) == out["steps"] == 8
    assert m["learning_rate"] == [h["learning_rate"] for h in logged]
    summary = next(h for h in out["history"] if "train_runtime" in h)
    assert m["train_runtime"] == summary["train_runtime"]
    assert last_steps(stack_env, run.id)["loss"] == 8
    props = run.get_properties()
    assert props["args.learning_rate"] == "0.01" and props["model.hidden_size"] == "16"
    assert props["model.num_attention_heads"] == "2"


def test_huggingface_callback_fails_the_run_when_train_raises(stack_env, tmp_path):
    exp = unique_name("hf-fail")
    script = HF.replace("EXPERIMENT", repr(exp))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), "explode"], cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "out of memory (pretend)" in out.stderr
    run_id = next(ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("RUN "))
    run = stored(run_id, "Failed")
    assert "out of memory (pretend)" in json.dumps(run.get_details()["error"])


# ------------------------------------------------------------------------------ Keras
KERAS = """
    import json
    import numpy as np
    import keras
    from runwatch.integrations.keras import RunwatchCallback

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x.sum(1) > 0).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
    cb = RunwatchCallback(experiment_name=EXPERIMENT, log_every_n_batches=2)
    history = model.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0, callbacks=[cb])
    print(json.dumps({"run": cb.run.id, "history": history.history}))
"""


def test_keras_callback(stack_env, tmp_path):
    exp = unique_name("keras")
    out = train(KERAS.replace("EXPERIMENT", repr(exp)), tmp_path, KERAS_BACKEND="torch")
    run = stored(out["run"])
    m = run.get_metrics()
    for name, values in out["history"].items():
        assert m[name] == pytest.approx(values, rel=1e-6), name
    assert set(out["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    # 48 training samples in batches of 16: 3 batches an epoch, 9 in all, every second one logged
    assert len(m["batch/loss"]) == 4 and last_steps(stack_env, run.id)["batch/loss"] == 8
    assert last_steps(stack_env, run.id)["val_loss"] == 2
    props = run.get_properties()
    assert props["fit.epochs"] == "3" and float(props["optimizer.learning_rate"]) == pytest.approx(0.01)


# ------------------------------------------------------------------------------ XGBoost, LightGBM
XGB = """
    import json
    import numpy as np
    import xgboost as xgb
    from runwatch.integrations.xgboost import RunwatchCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)); y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(int)
    dtrain, dvalid = xgb.DMatrix(x[:150], y[:150]), xgb.DMatrix(x[150:], y[150:])
    params = {"objective": "binary:logistic", "eval_metric": ["logloss", "error"], "max_depth": 2, "eta": 0.3}
    result = {}
    cb = RunwatchCallback(experiment_name=EXPERIMENT, params=params)
    xgb.train(params, dtrain, num_boost_round=6, evals=[(dtrain, "train"), (dvalid, "valid")],
              evals_result=result, callbacks=[cb], verbose_eval=False)
    print(json.dumps({"run": cb.run.id, "result": result}))
"""

LGB = """
    import json
    import numpy as np
    import lightgbm as lgb
    from runwatch.integrations.lightgbm import RunwatchCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)); y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(int)
    train, valid = lgb.Dataset(x[:150], y[:150]), lgb.Dataset(x[150:], y[150:])
    params = {"objective": "binary", "metric": ["binary_logloss", "auc"], "num_leaves": 4, "verbose": -1,
              "min_data_in_leaf": 5}
    result = {}
    cb = RunwatchCallback(experiment_name=EXPERIMENT)
    lgb.train(params, train, num_boost_round=6, valid_sets=[train, valid], valid_names=["train", "valid"],
              callbacks=[cb, lgb.record_evaluation(result)])
    print(json.dumps({"run": cb.run.id, "result": result}))
"""


@pytest.mark.parametrize("code, params", [(XGB, {"params.max_depth": "2", "params.eta": "0.3"}),
                                          (LGB, {"params.num_leaves": "4", "params.objective": "binary"})],
                         ids=["xgboost", "lightgbm"])
def test_boosting_callbacks(stack_env, tmp_path, code, params):
    exp = unique_name("boost")
    out = train(code.replace("EXPERIMENT", repr(exp)), tmp_path)
    run = stored(out["run"])
    m = run.get_metrics()
    names = set()
    for data, metrics in out["result"].items():
        for metric, values in metrics.items():
            names.add(f"{data}-{metric}")
            assert m[f"{data}-{metric}"] == pytest.approx(values, rel=1e-9), (data, metric)
            assert last_steps(stack_env, run.id)[f"{data}-{metric}"] == 5
    assert names and set(m) == names
    props = run.get_properties()
    for k, v in params.items():
        assert props[k] == v
