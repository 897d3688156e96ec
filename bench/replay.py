"""`python -m bench.replay [--quick] [--only flights,no_drift,...]`: the loop's retraining decisions replayed period
by period, against "never retrain" and "retrain every period", on the flights and on synthetic scenarios.

In-process and server-free: the same plain functions the flows compose (tasks/drift.py's Evidently check,
tasks/retrain_policy.py's decision with its label signal and shadow candidate (the function check-drift's
`shadow-challenger` task calls), tasks/drift_windows.py's windows and cooldown,
tasks/evaluation.py's time-honest split and tasks/gate.py's gate), with the default model. After each period
the loop sees that period's labels (as the demo now feeds them), decides, and the model it then serves is scored
on the next period. A decision is *right* by the counterfactual of issue 16: a model trained on the retrain
window ending there, scored on the next period, beats the serving champion by the gate's uplift exactly when the
loop retrained. Results: bench/results/replay-<name>.json with `--out` (the flights and the synthetic scenarios).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import common

POLICIES = ("loop", "never", "every")
SCENARIOS = ("flights", "no_drift", "feature_shift", "concept_drift", "broken_data", "broken_model")


@dataclass
class Period:
    period: str
    live: dict[str, float | None]  # policy → primary metric of the model it served this period
    decision: dict | None = None  # each loop's decision at the end of this period (None for the last)
    counterfactual: dict | None = None


@dataclass
class Scenario:
    name: str
    metric: str
    periods: list[Period] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        decided = [p for p in self.periods if p.counterfactual is not None]
        scored = self.periods[1:]  # the first period is served by the first model under every policy
        means = {}
        for pol in (*LOOPS, "never", "every"):
            vals = [p.live[pol] for p in scored if p.live.get(pol) is not None]
            means[pol] = round(float(np.mean(vals)), 4) if vals else None
        out: dict = {"decisions": len(decided), "mean_live": means}
        for lp in LOOPS:
            loop = [p.decision[lp] for p in self.periods if p.decision]
            out[lp] = {
                "right": sum(bool(p.counterfactual[lp]["right"]) for p in decided),
                "retrained": sum(bool(d.get("retrain")) for d in loop),
                "promoted": sum(bool(d.get("promoted")) for d in loop),
                "alerts": sum(bool(d.get("alert")) for d in loop),
                "signals": sorted({d.get("signal") for d in loop if d.get("signal")}),
            }
        return out


# --------------------------------------------------------------------------------------------------- data
def flights():
    from flywheel.core.spec import load_spec
    from flywheel.tasks import data

    spec = load_spec().with_overrides(drift_window="1 month", retrain_window="3 months", retrain_cooldown="1 month",
                                      time_zone="America/New_York")  # fmt: skip
    df = data.pull_dataset(spec)
    bounds = pd.date_range("2013-01-01", "2014-01-01", freq="MS", tz="America/New_York").tz_convert("UTC")
    return spec, df, list(bounds), 2  # the first model trains on the first two periods


def synthetic(kind: str, periods: int = 12, rows: int = 3000, seed: int = 0):
    """Monthly periods of a binary target that depends non-linearly on x1 and x2, with a categorical `c`:
    `feature_shift` moves x1 from period 6 on; `concept_drift` changes the relation (features unchanged) from period
    6; `broken_data` empties x2 in period 6; `broken_model` replaces the champion by a broken one in period 6."""
    from flywheel.core.spec import DatasetSpec

    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2020-01-01", tz="UTC")
    frames = []
    for k in range(periods):
        t0, t1 = start + pd.DateOffset(months=k), start + pd.DateOffset(months=k + 1)
        t = t0 + (t1 - t0) * np.sort(rng.random(rows))
        x1, x2, x3 = rng.normal(size=rows), rng.normal(size=rows), rng.normal(size=rows)
        c = rng.choice(["a", "b", "c"], size=rows)
        if kind == "feature_shift" and k >= 6:
            x1 = x1 + 2.5
        score = np.sin(2 * x1) + x2 + 0.5 * (c == "a")
        if kind == "concept_drift" and k >= 6:
            score = -np.sin(2 * x1) - x2 + 0.5 * (c == "a")
        y = (score + rng.normal(scale=0.5, size=rows) > 0.3).astype(int)
        frame = pd.DataFrame({"t": t, "x1": x1, "x2": x2, "x3": x3, "c": c, "y": y})
        if kind == "broken_data" and k == 6:
            frame["x2"] = np.nan
        frames.append(frame)
    spec = DatasetSpec(name=kind, source="synthetic", target="y", positive_class=1, numeric=["x1", "x2", "x3"],
                       categorical=["c"], event_time="t", drift_window="1 month", retrain_window="3 months",
                       retrain_cooldown="1 month")  # fmt: skip
    bounds = [start + pd.DateOffset(months=k) for k in range(periods + 1)]
    return spec, pd.concat(frames, ignore_index=True), bounds, 2


class BrokenModel:
    """A deployed model that went wrong: it predicts the negative class for every row."""

    def predict(self, X):
        return np.zeros(len(X), dtype=int)


# --------------------------------------------------------------------------------------------------- steps
class Replay:
    def __init__(self, spec, df, bounds, seed: int = 42, sample_cap: int = 5_000):
        from flywheel.core.timeutil import to_utc
        from flywheel.tasks.evaluation import primary_metric
        from flywheel.tasks.gate import GateThresholds

        self.spec, self.df, self.bounds, self.seed, self.cap = spec, df, bounds, seed, sample_cap
        self.ts = to_utc(df[spec.event_time])
        self.metric = primary_metric(spec.task)
        self.thresholds = GateThresholds()

    def rows(self, lo, hi) -> pd.DataFrame:
        return self.df.loc[(self.ts >= lo) & (self.ts < hi)].reset_index(drop=True)

    def fit(self, frame: pd.DataFrame, parts=None):
        from flywheel.tasks import model_specs, training

        if parts is None:  # all rows: the counterfactual and "retrain every period"
            X, y = training.feature_frame(frame, self.spec), training.target_series(frame, self.spec)
            parts = training.Split(X, X.iloc[:0], y, y.iloc[:0])
        return training.train_model(parts, self.spec, model_specs.default_model_spec(self.spec.task), self.seed)

    def score(self, model, frame: pd.DataFrame) -> float | None:
        from flywheel.tasks import training
        from flywheel.tasks.evaluation import score_predictions

        if model is None or frame.empty:
            return None
        X = training.feature_frame(frame, self.spec)
        return score_predictions(frame[self.spec.target], model.predict(X), self.spec)

    def train_gated(self, frame: pd.DataFrame, champion, champion_trained_until, fitted=None):
        """What the train flow does: a time-honest split, the candidate fitted before the holdout, the gate against
        the baseline and the champion on the holdout. (candidate, passed, reasons, its holdout metric). `fitted`: the
        candidate already fitted on this split (the shadow candidate of the decision), not fitted twice."""
        from flywheel.tasks import training
        from flywheel.tasks.evaluation import BASELINE_NAMES, baseline_metrics, evaluate_model, holdout_note
        from flywheel.tasks.gate import champion_overlap, promotion_gate
        from flywheel.tasks.validation import labelled_rows, validate_dataset

        validate_dataset(frame, self.spec, min_rows=100)  # broken data fails here: no candidate, no deploy
        frame = labelled_rows(frame, self.spec)
        parts = training.split.fn(frame, self.spec, self.seed)
        model = fitted if fitted is not None else self.fit(frame, parts)
        positive = training.positive_label(parts.y_test, self.spec)
        cand = evaluate_model(model, parts.X_test, parts.y_test, self.spec, positive)
        base = baseline_metrics(parts.X_train, parts.y_train, parts.X_test, parts.y_test, self.spec, positive)
        champ = evaluate_model(champion, parts.X_test, parts.y_test, self.spec, positive) if champion else None
        decision = promotion_gate(cand, champ, task=self.spec.task, thresholds=self.thresholds, champion_version="c",
                                  baseline=base, baseline_model=BASELINE_NAMES[self.spec.task])  # fmt: skip
        note = holdout_note(parts.X_test)
        decision.reasons.insert(0, note["note"])
        seen = champion_overlap(champion_trained_until, note, "c") if champion_trained_until else None
        if seen:
            decision.reasons.append(seen)
        return model, decision.passed, decision.reasons, cand.get(self.metric)

    def drift(self, reference: pd.DataFrame, current: pd.DataFrame):
        from flywheel.tasks import drift

        return drift.compute_drift(
            reference, current, drift.drift_columns(self.spec), drift_share=0.55, sample_cap=self.cap, seed=0,
            categorical=self.spec.categorical, min_rows=500,
        )  # fmt: skip


LOOPS = ("loop",)  # the loop as the flows run it


def decide(r: Replay, state: dict, month: pd.DataFrame, live: float | None, hi, window: pd.DataFrame, plan) -> dict:
    """The loop's decision at the end of a period, and what it does, as check-drift and train compose it: drift and
    label signals (the champion against its holdout, and the shadow candidate a retraining would make now against
    the champion on the latest labelled period) → should_retrain → the time-honest gate on the retrain window →
    promote, or keep the candidate as challenger."""
    from flywheel.tasks.drift import DriftDataError
    from flywheel.tasks.retrain_policy import LabelEvidence, shadow_challenger, should_retrain

    decision: dict = {"retrain": False, "promoted": False, "alert": False}
    shadow = None
    try:
        result = r.drift(state["reference"], month)
        decision["drift_share"] = round(result.drift_share, 3)
        ev = LabelEvidence(r.metric, len(month), "c", live, state["holdout"],
                           tolerance=r.spec.label_tolerance or 0.10, min_uplift=r.thresholds.min_uplift)  # fmt: skip
        if state["challenger"] is not None:
            ev.challenger_version, ev.champion_same_rows = "ch", live
            ev.challenger_live = r.score(state["challenger"], month)
        try:
            shadow = shadow_challenger(window, r.spec, state["model"], seed=r.seed, min_rows=100)
        except Exception as exc:  # noqa: BLE001 - a window the train flow would refuse gives no comparison
            decision["shadow_error"] = f"{type(exc).__name__}: {exc}"[:200]
        if shadow is not None:
            shadow.attach(ev)
            decision["shadow"] = {"gain": shadow.estimate.gain, "lower": shadow.estimate.lower,
                                  "champion": shadow.champion, "challenger": shadow.challenger}  # fmt: skip
        verdict = should_retrain(result, now_event_time=hi, last_retrain_event_time=state["last_retrain"],
                                 cooldown=plan.cooldown, min_rows=500, in_flight=False, labels=ev,
                                 time_zone=plan.time_zone)  # fmt: skip
        decision.update(retrain=verdict.retrain, signal=verdict.signal, reasons=verdict.reasons)
    except DriftDataError as exc:
        decision.update(alert=True, signal="broken data", reasons=[f"alert: {exc}"])
    if decision["retrain"]:
        state["last_retrain"] = hi
        try:
            fitted = shadow.model if shadow is not None else None  # the same fit the train flow would make
            cand, passed, gate_reasons, holdout = r.train_gated(window, state["model"], state["trained_until"], fitted)
            decision["gate"] = gate_reasons
            if passed:
                state.update(model=cand, holdout=holdout, reference=window, trained_until=str(hi), challenger=None)
                decision["promoted"] = True
            else:
                state["challenger"] = cand
        except Exception as exc:  # noqa: BLE001 - validation refusing broken data: no deploy
            decision.update(alert=True, gate=[f"training refused: {type(exc).__name__}: {exc}"[:300]])
    return decision


def run_scenario(name: str, quick: bool = False) -> Scenario:
    from flywheel.tasks import drift_windows

    started = time.perf_counter()
    spec, df, bounds, first = flights() if name == "flights" else synthetic(name, rows=1500 if quick else 3000)
    r = Replay(spec, df, bounds, sample_cap=5_000)
    plan = drift_windows.monitoring_plan(spec)
    out = Scenario(name, r.metric)
    init = r.rows(bounds[0], bounds[first])
    model0, _, _, holdout0 = r.train_gated(init, None, None)
    states = {lp: {"model": model0, "holdout": holdout0, "reference": init, "trained_until": str(bounds[first]),
                   "last_retrain": None, "challenger": None} for lp in LOOPS}  # fmt: skip
    every, never = model0, model0
    for k in range(first, len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        month = r.rows(lo, hi)
        if name == "broken_model" and k == 6:  # a bad deploy under every policy
            for st in states.values():
                st["model"] = BrokenModel()
            every = never = BrokenModel()
        live = {lp: r.score(st["model"], month) for lp, st in states.items()}
        live |= {"never": r.score(never, month), "every": r.score(every, month)}
        row = Period(str(pd.Timestamp(lo).tz_convert(spec.time_zone or "UTC").date())[:7], live)
        out.periods.append(row)
        if k == len(bounds) - 2:
            break
        nxt = r.rows(hi, bounds[k + 2])
        window = r.rows(drift_windows.window_before(hi, plan.retrain_window, plan.time_zone)[0], hi)
        serving = {lp: st["model"] for lp, st in states.items()}  # the champions when the decisions are taken
        row.decision = {lp: decide(r, st, month, live[lp], hi, window, plan) for lp, st in states.items()}
        # ---- the counterfactual (issue 16): a model on the retrain window, scored on the next period
        try:
            cf = r.fit(window)
        except Exception:  # noqa: BLE001
            cf = None
        cf_next = r.score(cf, nxt)
        row.counterfactual = {"retrained_next": cf_next}
        for lp in LOOPS:
            champ_next = r.score(serving[lp], nxt)
            helps = cf_next is not None and champ_next is not None and cf_next - champ_next >= r.thresholds.min_uplift
            row.counterfactual[lp] = {"champion_next": champ_next, "would_help": helps,
                                      "right": bool(row.decision[lp]["retrain"]) == bool(helps)}  # fmt: skip
        if cf is not None:
            every = cf  # "retrain every period" deploys that model unconditionally
    out.seconds = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller synthetic periods")
    ap.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    ap.add_argument("--out", default="replay.json", help="file name under bench/results/")
    args = ap.parse_args(argv)
    common.setup_env()
    names = [n for n in (args.only.split(",") if args.only else SCENARIOS) if n]
    results = {}
    for name in names:
        sc = run_scenario(name, args.quick)
        results[name] = {"summary": sc.summary(), "metric": sc.metric, "seconds": sc.seconds,
                         "periods": [asdict(p) for p in sc.periods]}  # fmt: skip
        print(f"{name}: {json.dumps(sc.summary())}  ({sc.seconds}s)", flush=True)
        for p in sc.periods:
            live = "  ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in p.live.items())
            acts = ""
            for lp in LOOPS:
                d, cf = (p.decision or {}).get(lp, {}), (p.counterfactual or {}).get(lp, {})
                sh = d.get("shadow") or {}
                gain = f"{sh['gain']:+.3f} (>= {sh['lower']:+.3f})" if sh else "-"
                acts += (f" | {lp}: {d.get('signal')} challenger gain {gain} retrain {d.get('retrain')!s:5} "
                         f"promoted {d.get('promoted')!s:5} right {cf.get('right')}")  # fmt: skip
            print(f"  {p.period}  {live}{acts}")
    path = common.RESULTS_DIR / args.out
    payload = {"benchmark": "replay", "scenarios": results, "policies": list(POLICIES)}
    if path.exists() and args.only:
        old = json.loads(path.read_text()).get("scenarios", {})
        payload["scenarios"] = {**old, **results}
    Path(path).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
