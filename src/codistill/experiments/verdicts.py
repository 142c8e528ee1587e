"""Verdicts: each finding's claim checked against the rows, with the reason spelled out.

Two numbers "differ" when their means are further apart than the larger of a floor (0.5 accuracy
points, 0.02 nats) and the combined standard deviation over seeds; otherwise they are "similar".
With one seed there is no standard deviation, only the floor, and the verdict says it is
provisional; with fewer than 3 seeds the verdict says how many. Regularization settings are
chosen on the validation split (`Experiment.select`); the test numbers decide the verdict.
"""

from __future__ import annotations

import math

from .results import Stat, aggregate
from .suite import Experiment

ACC_FLOOR, NLL_FLOOR = 0.5, 0.02
NOT_RUN = "not yet run"
SEEDS = 3  # what the suite asks for; fewer is said in the verdict


class Missing(Exception):
    """A variant the verdict needs has no rows."""


def margin(a: Stat, b: Stat, floor: float) -> float:
    return max(floor, math.hypot(a.std or 0.0, b.std or 0.0))


def compare(a: Stat, b: Stat, floor: float) -> int:
    """-1, 0 or 1: a below, similar to, or above b."""
    d = a.mean - b.mean
    return 0 if abs(d) <= margin(a, b, floor) else (1 if d > 0 else -1)


class Table:
    """Stats of one experiment's rows, by metric and variant."""

    def __init__(self, experiment: Experiment, rows: list[dict]):
        self.experiment, self.rows = experiment, rows
        self._cache: dict[str, dict[str, Stat]] = {}

    def get(self, metric: str, variant: str) -> Stat:
        if metric not in self._cache:
            self._cache[metric] = aggregate(self.rows, metric)
        if variant not in self._cache[metric]:
            raise Missing(variant)
        return self._cache[metric][variant]

    def has(self, variant: str) -> bool:
        return any(r["variant"] == variant for r in self.rows)

    def selected(self, candidates: tuple[str, ...] | None = None) -> str | None:
        """The variant of `candidates` (default `experiment.select`) best on the validation metric
        (None: none ran)."""
        e = self.experiment
        present = [v for v in (e.select if candidates is None else candidates) if self.has(v)]
        if not present:
            return None
        from .results import METRICS

        sign = 1 if METRICS[e.select_by].higher_is_better else -1
        return max(present, key=lambda v: sign * self.get(e.select_by, v).mean)


def pts(s: Stat) -> str:
    return f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.std is not None else "")


BUDGET_WORDS = {"": "the base budget", "-trained": "the trained budget"}
TOKENS_WORDS = "matched tokens (each codistilled model sees as many tokens as the all-reduce model)"


def judge(experiment: Experiment, rows: list[dict]) -> tuple[str, str]:
    """(verdict, reason) for one experiment: at its trained budget once every variant the verdict
    needs there ran (the base budget's reason beside it), else at the base budget; with matched-tokens
    variants, their verdict beside it (in the verdict once they ran)."""
    budgets = judge_budgets(experiment, rows)
    verdict, reason = budgets["base"]
    if experiment.trained and budgets["trained"][0] != NOT_RUN:
        (verdict, reason), (_, base) = budgets["trained"], budgets["base"]
        prep = "From" if experiment.name == "F3" else "At"
        if budgets["base"][0] != NOT_RUN:
            reason += f" {prep} the base budget: {base}"
        reason = f"{prep} {BUDGET_WORDS[experiment.trained]}: {reason}"
    elif experiment.trained and verdict == NOT_RUN and budgets["trained"][1].startswith("incomplete"):
        reason = f"at {BUDGET_WORDS[experiment.trained]}: {budgets['trained'][1]}"  # not "no results yet"
    if experiment.tokens:
        tokens, why = budgets["tokens"]
        if tokens != NOT_RUN:
            verdict = f"{verdict} at matched updates; {tokens} at matched tokens"
        reason += f" At {TOKENS_WORDS}: " + (why if tokens != NOT_RUN else f"{NOT_RUN} ({why})")
    return verdict, reason


def _budget_of(experiment: Experiment, variant: str) -> str:
    """`base`, `trained` or `tokens`: the budget a variant belongs to, by its name's suffix."""
    if experiment.tokens and variant.endswith(experiment.tokens):
        return "tokens"
    return "trained" if experiment.trained and variant.endswith(experiment.trained) else "base"


def judge_budgets(experiment: Experiment, rows: list[dict]) -> dict[str, tuple[str, str]]:
    """{"base": (verdict, reason), "trained": (verdict, reason)} and, with matched-tokens variants,
    "tokens": the claim judged at each budget on its own rows (NOT_RUN where the variants it needs
    have none; the tokens budget judges against the trained budget's all-reduce arms); "trained" is
    NOT_RUN for an experiment with one budget. Seed counts and smoke-test marks come from that
    budget's rows (controls that the verdict does not wait for, `Variant.judged`, aside)."""
    out = {}
    judged = {v.name for v in experiment.variants if v.judged}
    for which, suffix in (("base", ""), ("trained", experiment.trained), ("tokens", experiment.tokens)):
        if which == "tokens" and not suffix:
            continue
        if which == "trained" and not suffix:
            out[which] = (NOT_RUN, "this experiment has one budget.")
            continue
        mine = [r for r in rows if _budget_of(experiment, r["variant"]) == which]
        needed = [v.name for v in experiment.variants if which != "base" and v.judged and v.name.endswith(suffix)]
        missing = [name for name in needed if not any(r["variant"] == name for r in mine)]
        if which == "tokens":  # against all-reduce where it has converged: the trained budget's arms
            arms = {v.name: v.arm for v in experiment.variants}
            mine += [r for r in rows if arms.get(r["variant"]) == "allreduce"
                     and _budget_of(experiment, r["variant"]) == "trained"]
        out[which] = (NOT_RUN, f"incomplete: variant `{missing[0]}` has no rows yet.") if missing and mine \
            else _judge_at(experiment, mine, suffix, judged)
    return out


def _judge_at(experiment: Experiment, rows: list[dict], suffix: str, judged: set[str] | None = None
              ) -> tuple[str, str]:
    if not rows:
        return NOT_RUN, "no results yet; run the command above."
    table = Table(experiment, rows)
    fn = JUDGES[experiment.name]
    try:
        verdict, reason = fn(table, suffix) if experiment.trained else fn(table)
    except Missing as e:
        return NOT_RUN, f"incomplete: variant `{e.args[0]}` has no rows yet (run the full experiment)."
    counts: dict[str, int] = {}
    for r in rows:
        if judged is None or r["variant"] in judged:
            counts[r["variant"]] = counts.get(r["variant"], 0) + 1
    fewest = min(counts.values(), default=0)
    if fewest == 1:
        verdict += " (provisional: 1 seed)"
    elif fewest < SEEDS:
        verdict += f" ({fewest} seeds, not the {SEEDS} the suite asks for)"
    if any(r.get("quick") for r in rows):
        verdict += " (smoke-test settings, not a measurement)"
    return verdict, reason


F1_BUDGETS = (("-short", "a third of the budget"), ("", "the base budget"), ("-long", "four times the budget"),
              ("-trained", "four times the budget with the burn-in default"))


def _f1(t: Table, suffix: str = ""):
    """At one budget; the gap at every budget that ran is listed beside it (the sign flips with it)."""
    ar, cd = t.get("test_acc0", f"allreduce{suffix}"), t.get("test_acc0", f"codistill{suffix}")
    lower = compare(cd, ar, ACC_FLOOR) < 0
    loss_ar, loss_cd = t.get("train_loss", f"allreduce{suffix}"), t.get("train_loss", f"codistill{suffix}")
    higher_loss = compare(loss_cd, loss_ar, 0.01) > 0
    d_ar, d_cd = t.get("param_distance", f"allreduce{suffix}"), t.get("param_distance", f"codistill{suffix}")
    closer = compare(d_cd, d_ar, 0.01 * d_ar.mean) < 0
    held = sum((lower, higher_loss, closer))
    parts = [f"test accuracy {pts(cd)}% vs {pts(ar)}% (all-reduce): {'lower' if lower else 'not lower'}",
             f"training loss {loss_cd.mean:.4f} vs {loss_ar.mean:.4f}: {'higher' if higher_loss else 'not higher'}",
             f"||theta - theta_0|| {d_cd.mean:.2f} vs {d_ar.mean:.2f}: {'smaller' if closer else 'not smaller'}"]
    budgets = [(s, w) for s, w in F1_BUDGETS if t.has(f"allreduce{s}") and t.has(f"codistill{s}")]
    if len(budgets) > 1:
        parts.append("codistill minus all-reduce: " + ", ".join(
            f"{t.get('test_acc0', f'codistill{s}').mean - t.get('test_acc0', f'allreduce{s}').mean:+.2f} "
            f"points at {w}" for s, w in budgets))
    if t.has(f"codistill-burnin{suffix}"):  # the library's default, beside the paper's constant alpha
        gap = t.get("test_acc0", f"codistill-burnin{suffix}").mean - ar.mean
        parts.append(f"with the library's burn-in default (no distillation before the first trained exchange): "
                     f"{gap:+.2f} points")
    verdict = "reproduced" if held == 3 else ("partly" if held else "not reproduced")
    return verdict, "; ".join(parts) + "."


def _closes_gap(t: Table, suffix: str = ""):
    """F2 at one budget: the regularized variant best on validation vs all-reduce and vs constant
    weight decay."""
    ar, const = t.get("test_acc0", f"allreduce{suffix}"), t.get("test_acc0", f"codistill-constant-wd{suffix}")
    chosen = t.selected((f"regularized{suffix}", f"regularized-shifted{suffix}"))
    if chosen is None:
        raise Missing(f"regularized-shifted{suffix}")
    reg = t.get("test_acc0", chosen)
    closes = compare(reg, ar, ACC_FLOOR) >= 0
    contrast = compare(const, ar, ACC_FLOOR) < 0
    better = compare(reg, const, ACC_FLOOR) > 0
    reason = (f"`{chosen}` (chosen on validation) reaches {pts(reg)}% test accuracy vs {pts(ar)}% for "
              f"all-reduce and {pts(const)}% with constant weight decay")
    if closes and contrast:
        return "reproduced", reason + ": the gap closes, and constant weight decay stays worse."
    if closes:
        return "partly", reason + ": on par with all-reduce, but constant weight decay is on par too, so there " \
                                  "is no gap to close."
    if better:
        return "partly", reason + ": the recipe helps but does not close the gap."
    return "not reproduced", reason + ": the recipe does not beat constant weight decay."


def _f2(t: Table, suffix: str = ""):
    return _closes_gap(t, suffix)


def _f4(t: Table, suffix: str = ""):
    ar = t.get("test_acc0", f"allreduce{suffix}")
    reg = t.get("test_acc0", f"regularized-shifted{suffix}")
    const = t.get("test_acc0", f"codistill-constant-wd{suffix}")
    reason = (f"cosine schedule: regularized-shifted {pts(reg)}%, constant weight decay {pts(const)}%, "
              f"all-reduce {pts(ar)}% test accuracy")
    if compare(reg, ar, ACC_FLOOR) >= 0:
        gap = compare(const, ar, ACC_FLOOR) < 0
        return "reproduced", reason + (": codistillation matches all-reduce" + (
            ", and constant weight decay stays behind." if gap else
            " (constant weight decay does too: there is no gap to close)."))
    if compare(reg, const, ACC_FLOOR) > 0:
        return "partly", reason + ": the recipe helps but a gap remains."
    return "not reproduced", reason + ": codistillation stays behind all-reduce."


def _batch_scaling(t: Table, suffix: str = ""):
    """F3 at one budget, as the paper ran it: x2 the batch (LR x2, updates / 2, the warm-up fixed in
    epochs as Goyal et al. prescribe) against x1 for codistillation, all-reduce beside it; x4 is a
    labelled extra, reported and not judged."""
    parts, same = [], {}
    for k in (2, 4):
        for arm in ("codistill", "allreduce"):
            base = t.get("test_acc0", f"{arm}-batch-x1{suffix}")
            s = t.get("test_acc0", f"{arm}-batch-x{k}{suffix}")
            same[arm, k] = compare(s, base, ACC_FLOOR) == 0 or s.mean > base.mean
            extra = " (extra, beyond the paper's x2)" if k == 4 else ""
            parts.append(f"{arm} x{k}{extra}: {pts(s)}% vs {pts(base)}% at x1 "
                         f"({'similar' if same[arm, k] else 'worse'})")
    verdict = "reproduced" if same["codistill", 2] else "not reproduced"
    return verdict, "; ".join(parts) + "."


def _f3(t: Table, suffix: str = ""):
    # From the long budget the x2 and x4 runs still have enough updates (78 at the base budget's x4).
    return _batch_scaling(t, suffix)


PAPER_F5 = "the paper, IWSLT'14 De-En: codistillation 2.31 vs all-reduce 2.37 validation NLL"


def _f5(t: Table, suffix: str = ""):
    """Validation NLL of the codistillation regularization chosen on validation against all-reduce
    with its own regularization, then the control: all-reduce with the reduced regularization. At
    matched tokens (`-tokens`) the codistilled arms meet the trained budget's all-reduce arms; at the
    trained budget the alpha = 0 twins, when they ran, say what the distillation term itself does."""
    cd_suffix = suffix
    if suffix and suffix == t.experiment.tokens:
        suffix = t.experiment.trained
    ar = t.get("val_loss0", f"allreduce{suffix}")
    chosen = t.selected(tuple(v + cd_suffix for v in t.experiment.select))
    if chosen is None:
        raise Missing(t.experiment.select[0] + cd_suffix)
    cd = t.get("val_loss0", chosen)
    reason = f"validation NLL of `{chosen}` (chosen on validation) {cd.mean:.4f} vs {ar.mean:.4f} for all-reduce"
    try:
        reason += (f"; test NLL {t.get('test_loss0', chosen).mean:.4f} vs "
                   f"{t.get('test_loss0', f'allreduce{suffix}').mean:.4f}, test BLEU "
                   f"{pts(t.get('test_bleu0', chosen))} vs {pts(t.get('test_bleu0', f'allreduce{suffix}'))}")
        reason += f", ensemble of the two codistilled models {t.get('ens_val_loss', chosen).mean:.4f}"
        ens_bleu = t.get("ens_test_bleu", chosen)  # rows from before 2026-12-05 lack it
        seeds = f" ({ens_bleu.n} of {cd.n} seeds)" if ens_bleu.n != cd.n else ""
        reason += f" (test BLEU {pts(ens_bleu)}{seeds})"
    except Missing:
        pass
    reason += f" ({PAPER_F5})"
    twins = [(name, f"{name}-alpha0{suffix}") for name in ("codistill-ls0.1-drop0.1", "codistill-ls0-drop0")
             if cd_suffix == suffix and t.has(f"{name}{suffix}") and t.has(f"{name}-alpha0{suffix}")]
    if twins:  # same grid, half the batch at the same LR, no distillation
        reason += "; alpha = 0 twins (two independent models on the same grid): " + ", ".join(
            f"`{twin}` {t.get('val_loss0', twin).mean:.4f} vs {t.get('val_loss0', name + suffix).mean:.4f} "
            f"codistilled (distillation {t.get('val_loss0', name + suffix).mean - t.get('val_loss0', twin).mean:+.4f} nats)"
            for name, twin in twins)
    control_name = f"allreduce-ls0-drop0{suffix}"
    if t.has(control_name):  # does all-reduce need its regularization here? (the claim's regime)
        control = t.get("val_loss0", control_name)
        needs = compare(control, ar, NLL_FLOOR) > 0
        reason += (f"; all-reduce without label smoothing and dropout: {control.mean:.4f}, "
                   + ("so its regularization helps it here" if needs else "so its regularization does not help it"))
    if compare(cd, ar, NLL_FLOOR) <= 0:
        if t.has(control_name):
            control = t.get("val_loss0", control_name)
            if compare(control, cd, NLL_FLOOR) < 0:
                return "partly", (reason + ": codistillation reaches all-reduce's NLL, but all-reduce with the same "
                                  f"reduced regularization reaches {control.mean:.4f}, lower still: the gain comes "
                                  "from less regularization at this budget, not from codistillation.")
        return "reproduced", reason + ": codistillation reaches all-reduce's NLL."
    base_name = f"codistill-ls0.1-drop0.1{cd_suffix}"
    if chosen != base_name and t.has(base_name) and compare(cd, t.get("val_loss0", base_name), NLL_FLOOR) < 0:
        return "partly", reason + ": reducing the regularization helps but does not close the gap."
    return "not reproduced", reason + "."


F6_FRACTIONS = {"": (1, 2, 4, 8), "-trained": (1, 4, 16)}


def _f6(t: Table, suffix: str = ""):
    gaps = {}
    for k in F6_FRACTIONS[suffix]:
        a_name, c_name = f"allreduce-data-1/{k}{suffix}", f"codistill-data-1/{k}{suffix}"
        if t.has(a_name) and t.has(c_name):
            a, c = t.get("test_acc0", a_name), t.get("test_acc0", c_name)
            gaps[k] = (c.mean - a.mean, margin(a, c, ACC_FLOOR))
    if len(gaps) < len(F6_FRACTIONS[suffix]):
        missing = next(k for k in F6_FRACTIONS[suffix] if k not in gaps)
        raise Missing(f"codistill-data-1/{missing}{suffix}")
    smallest = max(gaps)
    grows = gaps[smallest][0] - gaps[1][0] > max(gaps[smallest][1], gaps[1][1])
    ahead = gaps[smallest][0] > gaps[smallest][1]
    reason = "codistill minus all-reduce test accuracy: " + ", ".join(
        f"{g:+.2f} at 1/{k}" for k, (g, _) in sorted(gaps.items()))
    if grows and ahead:
        return "reproduced", reason + ": the gap grows in codistillation's favour as data shrinks."
    if grows or ahead:
        return "partly", reason + (": the gap moves in codistillation's favour but it does not overtake."
                                   if grows else ": codistillation is ahead on little data but the gap does not grow.")
    return "not reproduced", reason + "."


def _f7(t: Table, suffix: str = ""):
    base = t.get("test_acc0", f"codistill-T-x1{suffix}")
    parts, t_robust = [], True
    for m in (0.25, 0.5, 2, 4):
        name = f"codistill-T-x{m:g}{suffix}"
        if m == 0.25 and not t.has(name):  # reported at the base budget only
            continue
        s = t.get("test_acc0", name)
        parts.append(f"T x{m:g}: {pts(s)}%")
        if m >= 0.5:  # the paper's range; 0.25x is reported, not judged
            t_robust &= compare(s, base, ACC_FLOOR) >= 0
    lr1, lr2, lr4 = (t.get("test_acc0", f"codistill-lr-x{m}{suffix}") for m in (1, 2, 4))
    lr_little = compare(lr2, lr1, ACC_FLOOR) == 0
    lr_hurts = compare(lr4, lr1, ACC_FLOOR) < 0
    parts.append(f"T x1 = LR x1: {pts(base)}%; LR x2: {pts(lr2)}%; LR x4: {pts(lr4)}%")
    score = sum((t_robust, lr_little, lr_hurts))
    verdict = "reproduced" if score == 3 else ("partly" if score else "not reproduced")
    notes = [f"the exchange period {'changes little' if t_robust else 'matters'} over 0.5x-4x",
             f"LR x2 {'changes little' if lr_little else 'changes the result'}",
             f"LR x4 {'hurts' if lr_hurts else 'does not hurt'}"]
    return verdict, "; ".join(parts) + ". In short: " + ", ".join(notes) + "."


def _beyond(t: Table):
    cd_ens, ind_ens = t.get("ens_test_acc", "codistill"), t.get("ens_test_acc", "independent")
    cd_agree, ind_agree = t.get("agreement", "codistill"), t.get("agreement", "independent")
    cd_gain, ind_gain = t.get("ens_gain", "codistill"), t.get("ens_gain", "independent")
    agrees_more = compare(cd_agree, ind_agree, ACC_FLOOR) > 0
    gains_less = cd_gain.mean < ind_gain.mean
    ens = compare(cd_ens, ind_ens, ACC_FLOOR)
    reason = (f"ensemble test accuracy {pts(cd_ens)}% (codistilled) vs {pts(ind_ens)}% (independent, alpha = 0): "
              f"{['lower', 'similar', 'higher'][ens + 1]}; agreement {cd_agree.mean:.2f}% vs {ind_agree.mean:.2f}%; "
              f"ensemble gain over the mean model {cd_gain.mean:+.2f} vs {ind_gain.mean:+.2f} points")
    if agrees_more and gains_less:
        return "confirmed", reason + ": codistilled models agree more and their ensemble gains less."
    if agrees_more or gains_less:
        return "partly", reason + "."
    return "not confirmed", reason + "."


SIDE_WORDS = ("behind", "on par with", "ahead of")  # by `compare`'s -1, 0, 1


def _peers(t: Table):
    """Codistillation (the recipe best on validation) against the best of DiLoCo and local SGD at the
    longest budget that ran, with all-reduce as the reference; then the mixed pair, together vs alone."""
    suffix = "-long" if t.has("diloco-long") else ""
    chosen = t.selected((f"codistill{suffix}", f"regularized-shifted{suffix}"))
    if chosen is None:
        raise Missing(f"codistill{suffix}")

    def line(name, label):
        acc, mb = t.get("test_acc0", name), t.get("exchange_mb", name)
        return f"{label} {pts(acc)}% ({mb.mean:.1f} MB inter-group per worker)"

    peers = {name: t.get("test_acc0", name) for name in (f"diloco{suffix}", f"localsgd{suffix}")}
    best_peer = max(peers, key=lambda n: peers[n].mean)
    cd = t.get("test_acc0", chosen)
    side = compare(cd, peers[best_peer], ACC_FLOOR)
    parts = [line(f"allreduce{suffix}", "all-reduce"), line(chosen, f"`{chosen}` (chosen on validation)"),
             line(f"diloco{suffix}", "DiLoCo"), line(f"localsgd{suffix}", "local SGD")]
    reason = ("test accuracy of model 0" + (" at four times the budget" if suffix else "") + ": "
              + "; ".join(parts) + f". Codistillation is {SIDE_WORDS[side + 1]} "
              f"the best peer ({best_peer.removesuffix(suffix)}).")
    pairs = [(name, label) for name, label in (("mixed-together-long", "the paper's constant alpha"),
                                               ("mixed-together-burnin-long", "the library's default burn-in"))
             if t.has(name)]
    if pairs and t.has("mixed-alone-long"):
        parts = []
        for name, label in pairs:
            gains = []
            for metric, model in (("test_acc0", "cnn"), ("test_acc1", "mlp")):
                together, alone = t.get(metric, name), t.get(metric, "mixed-alone-long")
                word = ["worse", "similar", "better"][compare(together, alone, ACC_FLOOR) + 1]
                gains.append(f"{model} {pts(together)}% together vs {pts(alone)}% alone ({word})")
            parts.append(f"with {label}, " + "; ".join(gains))
        reason += " Different architectures (only codistillation can pair them): " + ". ".join(parts) + "."
    return f"codistillation {SIDE_WORDS[side + 1]} its peers", reason


def _peers_mt(t: Table):
    """Translation: codistillation (the regularization chosen on validation) against the better of
    DiLoCo and local SGD by validation NLL of model 0, with all-reduce as the reference."""
    chosen = t.selected()
    if chosen is None:
        raise Missing(t.experiment.select[0])

    def line(name, label):
        return (f"{label} {t.get('val_loss0', name).mean:.4f} (test BLEU {pts(t.get('test_bleu0', name))}, "
                f"{t.get('exchange_mb', name).mean:.1f} MB inter-group per worker)")

    peers = {name: t.get("val_loss0", name) for name in ("diloco", "localsgd")}
    best_peer = min(peers, key=lambda n: peers[n].mean)
    side = -compare(t.get("val_loss0", chosen), peers[best_peer], NLL_FLOOR)  # lower NLL is ahead
    reason = ("validation NLL of model 0: " + "; ".join(
        [line("allreduce", "all-reduce"), line(chosen, f"`{chosen}` (chosen on validation)"),
         line("diloco", "DiLoCo"), line("localsgd", "local SGD")])
        + f". Codistillation is {SIDE_WORDS[side + 1]} the best peer ({best_peer}).")
    return f"codistillation {SIDE_WORDS[side + 1]} its peers", reason


def _lm(t: Table):
    """F5's judgement for language models: NLL per token of the dropout setting chosen on validation."""
    ar = t.get("val_loss0", "allreduce")
    chosen = t.selected()
    if chosen is None:
        raise Missing(t.experiment.select[0])
    cd = t.get("val_loss0", chosen)
    reason = (f"validation NLL per token of `{chosen}` (chosen on validation) {cd.mean:.4f} vs {ar.mean:.4f} "
              f"for all-reduce (perplexity {math.exp(cd.mean):.1f} vs {math.exp(ar.mean):.1f})"
              + "".join(f", {label} {t.get('val_loss0', name).mean:.4f}" for name, label in
                        (("diloco", "DiLoCo"), ("localsgd", "local SGD")) if t.has(name)))
    if compare(cd, ar, NLL_FLOOR) <= 0:
        if t.has("allreduce-drop0"):
            control = t.get("val_loss0", "allreduce-drop0")
            if compare(control, cd, NLL_FLOOR) < 0:
                return "partly", (reason + f": codistillation reaches all-reduce's NLL, but all-reduce without "
                                  f"dropout reaches {control.mean:.4f}, lower still.")
        return "reproduced", reason + ": codistillation reaches all-reduce's NLL."
    base = t.get("val_loss0", "codistill-drop0.1") if t.has("codistill-drop0.1") else None
    if base is not None and compare(cd, base, NLL_FLOOR) < 0:
        return "partly", reason + ": reducing dropout helps but does not close the gap."
    return "not reproduced", reason + "."


def _cheap_teachers(t: Table, metric: str, floor: float, unit: str):
    """Each cheaper teacher that ran against the paper's (`codistill-trained`) on `metric`: within
    seed noise (the suite's floor or the seeds' spread) or not."""
    paper = t.get(metric, "codistill-trained")
    higher = metric.startswith(("val_acc", "test_acc"))
    parts, kept = [], []
    for v in t.experiment.variants:
        if v.name == "codistill-trained" or not v.name.endswith("-trained") or not t.has(v.name):
            continue
        cheap = t.get(metric, v.name)
        side = compare(cheap, paper, floor) * (1 if higher else -1)
        word = ("worse than", "within seed noise of", "better than")[side + 1]
        parts.append(f"`{v.name}` {pts(cheap)}{unit} ({word} the paper's teacher)")
        if side >= 0:
            kept.append(v.name)
    if not parts:
        raise Missing(t.experiment.variants[1].name)
    reason = f"{metric} of model 0: the paper's teacher {pts(paper)}{unit}; " + "; ".join(parts) + "."
    return (f"{len(kept)} of {len(parts)} cheaper teachers keep the paper's accuracy" if higher else
            f"{len(kept)} of {len(parts)} cheaper teachers keep the paper's NLL"), reason


def _teachers(t: Table):
    return _cheap_teachers(t, "test_acc0", ACC_FLOOR, "%")


def _teachers_mt(t: Table):
    return _cheap_teachers(t, "val_loss0", NLL_FLOOR, "")


def _topologies(t: Table):
    """n = 4: ring and random (one teacher per step) against all-to-all (three) by the mean test
    accuracy of the four models, with each arm's measured compute per step over all-reduce's (the
    teacher cost) and the bytes each worker sent; all-reduce is the reference."""
    names = {"allreduce-trained": "all-reduce", "all-trained": "all-to-all", "ring-trained": "ring",
             "random-trained": "random peer"}
    acc = {n: t.get("test_acc_mean", n) for n in names}
    ar_ms = t.get("compute_ms", "allreduce-trained").mean
    cost = {n: t.get("compute_ms", n).mean / ar_ms for n in names}
    parts = [f"{label} {pts(acc[n])}% (compute/step {cost[n]:.2f}x all-reduce's, "
             f"{t.get('exchange_mb', n).mean:.1f} MB sent per worker)" for n, label in names.items()]
    reason = "test accuracy, mean of the models: " + "; ".join(parts)
    kept = {n: compare(acc[n], acc["all-trained"], ACC_FLOOR) >= 0 for n in ("ring-trained", "random-trained")}
    cheaper = {n: cost[n] < cost["all-trained"] for n in kept}
    held = [names[n] for n in kept if kept[n] and cheaper[n]]
    words = [f"{names[n]} {'keeps' if kept[n] else 'loses'} all-to-all's accuracy at "
             f"{cost[n] / cost['all-trained']:.2f}x its compute per step" for n in kept]
    reason += ". " + "; ".join(words)[:1].upper() + "; ".join(words)[1:] + "."
    verdict = "confirmed" if len(held) == 2 else ("partly" if held else "not confirmed")
    return verdict, reason


def _family(t: Table, suffix: str = ""):
    """A big and a small model trained together against each alone (alpha = 0, same grid) and against
    the two-stage baseline (the small one distilled from the trained big one, frozen): the small
    model's gain decides; the big model's change and the pair's ensemble are reported beside it."""
    small = {v: t.get("test_acc_small", f"{v}{suffix}") for v in ("together", "alone", "offline")}
    big = {v: t.get("test_acc_big", f"{v}{suffix}") for v in ("together", "alone")}
    ens = {v: t.get("ens_pair_acc", f"{v}{suffix}") for v in ("together", "alone")}
    gain = compare(small["together"], small["alone"], ACC_FLOOR)
    vs_offline = compare(small["together"], small["offline"], ACC_FLOOR)
    big_change = compare(big["together"], big["alone"], ACC_FLOOR)
    words = ("worse", "similar", "better")
    reason = (f"small model {pts(small['together'])}% trained beside the big one vs {pts(small['alone'])}% alone "
              f"({small['together'].mean - small['alone'].mean:+.2f} points, {words[gain + 1]}) and "
              f"{pts(small['offline'])}% distilled offline from the trained big one (two-stage, "
              f"{small['together'].mean - small['offline'].mean:+.2f} points, {words[vs_offline + 1]}); big model "
              f"{pts(big['together'])}% together vs {pts(big['alone'])}% alone "
              f"({big['together'].mean - big['alone'].mean:+.2f} points, {words[big_change + 1]}); ensemble of the "
              f"pair {pts(ens['together'])}% together vs {pts(ens['alone'])}% for the two trained alone")
    if gain > 0:
        how = "as much as" if vs_offline >= 0 else "less than"
        return f"small model gains, {how} two-stage", reason + "."
    return "small model does not gain", reason + "."


JUDGES = {"Family": _family, "Topologies": _topologies, "Teachers": _teachers, "TeachersMT": _teachers_mt, "Peers": _peers, "PeersMT": _peers_mt, "F1": _f1, "F2": _f2, "F3": _f3, "F4": _f4, "F5": _f5, "F6": _f6, "F7": _f7, "Beyond": _beyond,
          "LM": _lm}
