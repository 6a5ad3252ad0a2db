"""What system metrics and the framework integrations cost the training loop.

System metrics (producers/system.py): a training loop of 2 ms steps (pure-Python work that holds the GIL, the
worst case for a sampling thread, and one `run.log` per step) runs in alternating half-second blocks with the
process's sampling thread reporting into the run and not; the figure is the on blocks' time over the off
blocks' in the same process. The same loop with both halves off gives the measurement's own noise (A/A), and
a sampling interval 100× shorter than the default shows the cost the default spreads over its 10 s. The
sampling thread's CPU time per sample, over the interval, is the load it adds whatever the loop does.

Integrations (runwatch/integrations/): each framework's hook called as its training loop calls it, with the
metrics of one step (4 numbers), against `run.log` of the same 4 values with the same step: the hook's own
cost per step, over the plain calls', in the same process.
"""

from __future__ import annotations

from pathlib import Path

LOOP = r'''
import json, os, sys, time
from time import perf_counter as pc
from runwatch import Workspace, Experiment
from runwatch.producers import system

interval, seconds = float(sys.argv[1]), float(sys.argv[2])
run = Experiment(Workspace.from_config(), "system-bench").start_logging()  # RUNWATCH_SYSTEM_METRICS=false
mon = system.Monitor(interval)

def work(n):
    s = 0
    for i in range(n):
        s += i * i
    return s

# calibrate one step to 2 ms of GIL-holding work
n = 20000
while True:
    t = pc(); work(n); d = pc() - t
    if d > 0.0005:
        break
    n *= 2
n = int(n * 0.002 / d)
STEPS = 250  # a block: 0.5 s

def block(on, k):
    if on:
        mon.watch(run)
    else:
        mon.unwatch(run.id)
    t = pc()
    for i in range(STEPS):
        work(n)
        run.log("loss", i * 0.001, step=k * STEPS + i)
    return pc() - t

mode = os.environ["BENCH_MODE"]  # "ab": on and off alternate; "aa": both halves off
a = b = 0.0
k = 0
for _ in range(3):
    block(False, k); k += 1  # warm-up
t_end = time.time() + seconds
while time.time() < t_end:
    a += block(mode == "ab", k); k += 1
    b += block(False, k); k += 1
mon.unwatch(run.id)
mon.stop()
run.complete()
run.flush(30)
print(json.dumps({"on": a, "off": b, "blocks": k, "step_ms": (a + b) / k / STEPS * 1000, "samples": mon.samples,
                  "sample_cpu_ms": mon.seconds / max(1, mon.samples) * 1000,
                  "dropped": run.emitter.stats.points_dropped}))
'''

HOOKS = r'''
import gc, json, os, sys, time, types
from time import perf_counter_ns as pc
os.environ.setdefault("KERAS_BACKEND", "torch")
from runwatch import Workspace, Experiment
N = int(sys.argv[1])
run = Experiment(Workspace.from_config(), "hooks-bench").start_logging()
names = ["loss", "accuracy", "lr", "grad_norm"]

def values(i):
    return [1.0 / (i + 1), i * 1e-6, 1e-3, 0.5 + i * 1e-7]

def plain(i):
    for k, v in zip(names, values(i)):
        run.log(k, v, step=i)

hooks, missing = {}, {}

try:
    from runwatch.integrations.lightning import RunwatchLogger
    lg = RunwatchLogger(run=run)
    hooks["Lightning log_metrics"] = lambda i: lg.log_metrics(dict(zip(names, values(i))), step=i)
except ImportError as exc:
    missing["Lightning"] = str(exc)
try:
    import transformers
    from runwatch.integrations.huggingface import RunwatchCallback as HF
    hf, state = HF(run=run), transformers.TrainerState()
    def hf_step(i):
        state.global_step = i
        hf.on_log(None, state, None, logs=dict(zip(names, values(i))))
    hooks["Hugging Face on_log"] = hf_step
except ImportError as exc:
    missing["Hugging Face"] = str(exc)
try:
    from runwatch.integrations.keras import RunwatchCallback as KC
    kc = KC(run=run, log_every_n_batches=1)
    hooks["Keras on_train_batch_end"] = lambda i: kc.on_train_batch_end(i, dict(zip(names, values(i))))
except ImportError as exc:
    missing["Keras"] = str(exc)
try:
    from runwatch.integrations.xgboost import RunwatchCallback as XC
    xc = XC(run=run)
    def xgb_step(i):
        v = values(i)  # XGBoost's evaluation log: {data: {metric: [value per iteration]}}
        xc.after_iteration(None, i, {"train": {"rmse": [v[0]], "mae": [v[1]]}, "eval": {"rmse": [v[2]], "mae": [v[3]]}})
    hooks["XGBoost after_iteration"] = xgb_step
except ImportError as exc:
    missing["XGBoost"] = str(exc)
try:
    from runwatch.integrations.lightgbm import RunwatchCallback as LC
    lc = LC(run=run)
    lc._params_done = True
    def lgb_step(i):
        v = values(i)
        lc(types.SimpleNamespace(params={}, iteration=i, end_iteration=N * 10, evaluation_result_list=[
            ("train", "l2", v[0], False), ("train", "l1", v[1], False), ("valid", "l2", v[2], False),
            ("valid", "l1", v[3], False)]))
    hooks["LightGBM callback"] = lgb_step
except ImportError as exc:
    missing["LightGBM"] = str(exc)

def per_step(fn, base):
    for i in range(2000):
        fn(base + i)
    gc.disable()
    t = pc()
    for i in range(N):
        fn(base + 2000 + i)
    d = pc() - t
    gc.enable()
    return d / N

out, base = {}, 0
for _ in range(3):  # interleaved rounds; each figure's best round against the plain calls' best
    for name, fn in [("plain run.log", plain), *hooks.items()]:
        base += N + 2000
        out.setdefault(name, []).append(per_step(fn, base))
run.flush(60)
print(json.dumps({"ns": {k: min(v) for k, v in out.items()}, "missing": missing,
                  "dropped": run.emitter.stats.points_dropped}))
'''


def bench_system(quick: bool, broker, tmp: Path, record, console, env_for, run_json) -> None:
    console.rule("System metrics and integrations: what the training loop pays")
    seconds = 20 if quick else 60
    rows = {}
    for label, interval, mode in [("A/A (both halves off)", 10.0, "aa"), ("default 10 s interval", 10.0, "ab"),
                                  ("0.1 s interval (100× the default rate)", 0.1, "ab")]:
        env = env_for(tmp / f"sys-{mode}-{interval}", broker.bootstrap, f"sy{len(rows)}.")
        env.update(BENCH_MODE=mode, RUNWATCH_SYSTEM_METRICS="false")
        rows[label] = r = run_json(LOOP, interval, seconds, env=env, timeout=seconds * 3 + 120)
        rows[label]["ratio"] = r["on"] / r["off"]
    aa, d10, d01 = (rows[k] for k in rows)
    noise = abs(aa["ratio"] - 1) * 100
    record("2 ms steps, system metrics every 10 s: time on / off", d10["ratio"], "×", "≤ 1.002",
           f"{d10['samples']} samples over {seconds} s on; A/A noise of the same loop {noise:.2f} %; "
           f"step {d10['step_ms']:.2f} ms", met=d10["ratio"] <= 1.002)
    record("2 ms steps, system metrics every 0.1 s: time on / off", d01["ratio"], "×",
           note=f"{d01['samples']} samples; at the 10 s default this is "
                f"{d01['ratio'] - 1:.4f} % of the loop")
    share = d01["sample_cpu_ms"] / 1000 / 10.0 * 100
    record("sampling thread CPU per sample", d01["sample_cpu_ms"], "ms",
           note=f"over the 10 s interval: {share:.4f} % of one core")
    record("sampling thread CPU share at the 10 s default", share, "%", "≤ 0.2", met=share <= 0.2)

    n = 5_000 if quick else 20_000
    hooks = run_json(HOOKS, n, env=env_for(tmp / "hooks", broker.bootstrap, "hk."), timeout=900)
    plain = hooks["ns"].pop("plain run.log")
    record("plain run.log of 4 values, per step", plain, "ns", note="the integrations' baseline, same process")
    for name, ns in hooks["ns"].items():
        record(f"{name} per step / plain run.log", ns / plain, "×",
               note=f"{ns:,.0f} ns per step of 4 values ({ns - plain:,.0f} ns over the plain calls)")
    for name, why in hooks["missing"].items():
        console.print(f"  {name}: not installed here, not measured ({why})")
