"""`azureml.core` for unchanged code (runwatch-azureml, compat/azureml; `./dev` installs it into the venv): a
script written against azureml.core, submitted as Azure's distributed PyTorch job; transformers' own
AzureMLCallback (`report_to="azure_ml"`) in a real Trainer; a notebook of Azure's managing-runs calls through a
real Jupyter kernel (nbclient), top to bottom with no sleeps. Against the real embedded stack.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import nbformat
import pytest
from conftest import unique_name
from nbclient import NotebookClient

from runwatch.producers.watch import RunFailedError

UNCHANGED = """
    import os, sys
    from azureml.core import Run

    run = Run.get_context()
    rank = int(os.environ["RANK"])
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["FROM_ENVIRONMENT"] == "yes"
    for epoch in range(5):
        run.log("loss", 1.0 / (epoch + 1) + rank)
    if rank == 0:
        run.log_list("lr", [0.1, 0.01])
        run.tag("framework", "pytorch")
        parent = run.parent
    print("rank", rank, "done", flush=True)
"""


def _write(tmp: Path, name: str, code: str) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_text(textwrap.dedent(code))
    return src


def test_an_unchanged_azureml_core_script_is_submitted_and_read_back(stack_env, tmp_path):
    from azureml.core import Environment, Experiment, ScriptRunConfig, Workspace
    from azureml.core.runconfig import PyTorchConfiguration

    src = _write(tmp_path, "train.py", UNCHANGED)
    ws = Workspace.from_config()
    env = Environment.get(ws, "AzureML-PyTorch-1.13-CPU")
    env.environment_variables = {"FROM_ENVIRONMENT": "yes"}
    config = ScriptRunConfig(source_directory=str(src), script="train.py", environment=env,
                             distributed_job_config=PyTorchConfiguration(process_count=2))
    run = Experiment(ws, unique_name("unchanged")).submit(config)
    details = run.wait_for_completion(show_output=True, timeout=120)
    assert details["status"] == "Completed", details
    metrics = run.get_metrics()
    assert sorted(metrics["loss"]) == sorted([1.0 / (e + 1) + r for r in (0, 1) for e in range(5)])
    assert metrics["lr"] == [0.1, 0.01] and run.get_tags()["framework"] == "pytorch"
    driver = run.get_details_with_logs()["logFiles"]
    assert "rank 0 done" in driver["azureml-logs/70_driver_log_0.txt"]
    assert "rank 1 done" in driver["azureml-logs/70_driver_log_1.txt"]


def test_an_unchanged_azureml_script_that_fails_raises_as_in_azure(stack_env, tmp_path):
    from azureml.core import Experiment, ScriptRunConfig, Workspace

    src = _write(tmp_path, "train.py", "from azureml.core import Run\nRun.get_context()\nraise SystemExit(4)\n")
    run = Experiment(Workspace.from_config(), unique_name("unchanged-fail")).submit(
        ScriptRunConfig(source_directory=str(src), script="train.py"))
    with pytest.raises(RunFailedError):
        run.wait_for_completion(timeout=120)
    assert run.get_status() == "Failed"


TRAINER = """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)  # built from a config: nothing downloaded


    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(1, 64, (8,), generator=g),
                    "attention_mask": torch.ones(8, dtype=torch.long), "labels": torch.tensor(i % 2)}


    args = TrainingArguments(output_dir="out", report_to=["azure_ml"], logging_steps=1, num_train_epochs=2,
                             per_device_train_batch_size=8, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Pairs())
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks if "AzureML" in type(c).__name__] == \\
        ["AzureMLCallback"]
    trainer.train()
    print("trained", trainer.state.global_step, flush=True)
"""


def test_transformers_own_azureml_callback_logs_a_real_trainer(stack_env, tmp_path):
    from azureml.core import Experiment, ScriptRunConfig, Workspace

    src = _write(tmp_path, "train.py", TRAINER)
    run = Experiment(Workspace.from_config(), unique_name("hf-azureml")).submit(
        ScriptRunConfig(source_directory=str(src), script="train.py",
                        environment_variables={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}))
    details = run.wait_for_completion(show_output=False, timeout=300)
    assert details["status"] == "Completed", run.get_details_with_logs()["logFiles"]
    metrics = run.get_metrics()
    steps = 2 * 64 // 8
    assert len(metrics["loss"]) == steps and all(isinstance(v, float) and v > 0 for v in metrics["loss"])
    assert len(metrics["learning_rate"]) == steps and metrics["learning_rate"][0] > metrics["learning_rate"][-1]
    assert metrics["epoch"][-1] == 2.0 and isinstance(metrics["train_runtime"], float)
    assert f"trained {steps}" in run.get_details_with_logs()["logFiles"]["azureml-logs/70_driver_log_0.txt"]


# Azure's managing-runs and logging notebooks, their calls in order: each cell asserts what it read, right after
# the write, with no sleep.
CELLS = [
    """
    from azureml.core import Workspace, Experiment, Run, ScriptRunConfig
    from azureml.widgets import RunDetails
    ws = Workspace.from_config()
    exp = Experiment(workspace=ws, name=EXPERIMENT)
    (ws.name, ws.location, ws.resource_group)
    """,
    """
    notebook_run = exp.start_logging(display_name="notebook")
    assert notebook_run.get_status() == "Running"
    notebook_run.log(name="message", value="Hello from run!")
    notebook_run.log("accuracy", 0.9)
    assert notebook_run.get_metrics()["message"] == "Hello from run!"
    """,
    """
    notebook_run.add_properties({"author": "azureml-user"})
    assert notebook_run.get_properties()["author"] == "azureml-user"
    notebook_run.tag("quality", "great run")
    notebook_run.set_tags({"fast": None, "stage": "1"})
    assert notebook_run.get_tags() == {"quality": "great run", "fast": None, "stage": "1"}
    notebook_run.remove_tags(["stage"])
    assert "stage" not in notebook_run.get_tags()
    """,
    """
    notebook_run.display_name = "renamed in the notebook"
    notebook_run.description = "described"
    d = notebook_run.get_details()
    assert (d["displayName"], d["description"], d["status"]) == ("renamed in the notebook", "described", "Running")
    assert "endTimeUtc" not in d and d["target"] == "local" and d["submittedBy"]
    """,
    """
    notebook_run.log_list("fibonacci", [0, 1, 1, 2, 3, 5, 8])
    notebook_run.log_row("roc", fpr=0.0, tpr=0.0)
    notebook_run.log_row("roc", fpr=0.5, tpr=0.8)
    notebook_run.log_table("pr", {"recall": [0.9, 0.5], "precision": [0.6, 0.9]})
    m = notebook_run.get_metrics()
    assert m["fibonacci"] == [0, 1, 1, 2, 3, 5, 8] and list(m["roc"]) == ["fpr", "tpr"]
    assert list(m["pr"]) == ["recall", "precision"]
    """,
    """
    with notebook_run.child_run(name="child") as child:
        child.log("score", 0.5)
    kids = notebook_run.get_children()
    assert [k.id for k in kids] == [child.id] and kids[0].get_status() == "Completed"
    more = notebook_run.create_children(tag_key="fold", tag_values=["a", "b"])
    assert [k.get_tags()["fold"] for k in more] == ["a", "b"] and len(notebook_run.get_children()) == 3
    for k in more:
        k.complete()
    """,
    """
    assert [r.id for r in exp.get_runs(tags={"quality": "great run"})] == [notebook_run.id]
    assert [r.id for r in Run.list(exp, status="Running")] == [notebook_run.id]
    assert exp.name in [e.name for e in Experiment.list(ws)]
    html = notebook_run._repr_html_()
    assert notebook_run.id in html and "href=" in html
    """,
    """
    details = RunDetails(notebook_run)
    details.show()
    assert details.refresh()["status"] == "Running"
    notebook_run.complete()
    assert notebook_run.get_status() == "Completed" and details.refresh()["status"] == "Completed"
    assert notebook_run.get_details()["endTimeUtc"]
    """,
    """
    import pathlib
    src = pathlib.Path("src"); src.mkdir(exist_ok=True)
    (src / "train.py").write_text("from azureml.core import Run\\nRun.get_context().log('a', 1.0)\\nprint('hi')\\n")
    submitted = exp.submit(ScriptRunConfig(source_directory="src", script="train.py"))
    snapshot = submitted.restore_snapshot(path="restored")
    assert snapshot.endswith(".zip") and pathlib.Path(snapshot).parent.name == "restored"
    submitted.wait_for_completion(show_output=True)
    assert submitted.get_metrics() == {"a": 1.0} and submitted.get_status() == "Completed"
    logs = submitted.get_details_with_logs()["logFiles"]
    assert "hi" in logs["azureml-logs/70_driver_log_0.txt"]
    assert all(pathlib.Path(p).is_file() for p in submitted.get_all_logs(destination="logs"))
    """,
]


def test_azures_notebook_calls_run_top_to_bottom_in_a_real_kernel(stack_env, tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"EXPERIMENT = {unique_name('notebook')!r}")]
    nb.cells += [nbformat.v4.new_code_cell(textwrap.dedent(c).strip()) for c in CELLS]
    client = NotebookClient(nb, kernel_name="python3", timeout=180, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=dict(os.environ))
    assert all(c.get("execution_count") for c in nb.cells), "every cell ran"
    shown = [o for o in nb.cells[-2].outputs if o.get("output_type") == "display_data"]
    assert shown and "application/vnd.jupyter.widget-view+json" in shown[0]["data"]
    assert "Completed" in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
