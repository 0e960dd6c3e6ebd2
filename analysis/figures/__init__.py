"""The paper's figures (Olsson et al. 2022) rebuilt from run directories: `python -m analysis figures`.

`make_figures(paths, out_dir)` reads run or sweep directories and writes, for every figure it can make,
`NN_name.png`, `NN_name.pdf` and the data drawn, `NN_name.parquet`; then `index.html` and `index.md`
listing them (and the figures it could not make, with why). One module per figure family:

    curves.py     1 ICL score, 2 loss and the 1-layer bump, 3 per-head scores, 6 smeared key
    heatmaps.py   4 loss by token index and its log-index derivative; `heads_heatmap` for W&B
    pca.py        5 joint PCA of per-token losses
    ablation.py   7 per-head ICL attribution (from `python -m analysis ablate`)
    table.py      8 the model analysis table
    attention.py  9 attention patterns of the strongest induction and previous-token heads
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from train.plots import heads_heatmap

__all__ = ["FIGURES", "make_figures", "heads_heatmap"]

# (stem, title); the stem's name part is what `--only` takes.
FIGURES = (
    ("01_icl_score", "1. ICL score over training"),
    ("02_loss", "2. Loss over training, against the 1-layer model"),
    ("03_head_scores", "3. Per-head prefix-matching and previous-token scores"),
    ("04_loss_by_position", "4. Loss by token index over training, and its log-index derivative"),
    ("05_pca", "5. Per-token-loss PCA trajectories"),
    ("06_smeared_key", "6. Smeared key vs vanilla"),
    ("07_ablation", "7. Per-head ICL attribution by ablation"),
    ("08_model_table", "8. Model analysis table"),
    ("09_attention", "9. Attention patterns of the strongest heads"),
)


def _builders(runs, pca) -> dict[str, Callable]:
    from .attribution import ablation_figure
    from .attention import attention_figure
    from .curves import heads_figure, icl_figure, loss_figure, smeared_figure
    from .heatmaps import loss_heatmap_figure
    from .pca import pca_figure
    from .model_table import table_figure

    return {
        "01_icl_score": lambda: icl_figure(runs),
        "02_loss": lambda: loss_figure(runs),
        "03_head_scores": lambda: heads_figure(runs),
        "04_loss_by_position": lambda: loss_heatmap_figure(runs),
        "05_pca": lambda: pca_figure(runs, pca()),
        "06_smeared_key": lambda: smeared_figure(runs),
        "07_ablation": lambda: ablation_figure(runs),
        "08_model_table": lambda: table_figure(runs, pca()),
        "09_attention": lambda: attention_figure(runs),
    }


def make_figures(paths: list[str | Path], out_dir: str | Path, only: list[str] | None = None,
                 strict: bool | None = None, log: Callable[[str], None] = print, member: int | None = None) -> list:
    """Make the figure set for the runs under `paths` into `out_dir`; returns the index entries.

    `only` picks figures by name (`["icl_score", "pca"]`) or stem. A figure the runs cannot support is
    skipped with a one-line note (and listed in the index as not made), or, when `strict` (the default
    when `only` is given: a figure asked for by name), is an AnalysisError. Bad input (a missing
    directory, a run without metrics) is an AnalysisError naming it. Ensembles (`seeds=N`) give the
    band figures (`bands.py`); with `member`, the figures of that member of each ensemble.
    """
    from ..runs import AnalysisError, member_path
    from .bands import band_figures, find_ensembles
    from .run_set import open_runs

    ensembles = find_ensembles(paths)
    if member is not None:
        if not ensembles:
            raise AnalysisError(f"--member {member}: no ensemble (python -m train seeds=N) among {', '.join(map(str, paths))}")
        paths = [p for p in paths if Path(p) not in ensembles and not find_ensembles([p])]
        paths += [member_path(e, member) for e in ensembles]
    elif ensembles:
        singles = [str(p) for p in paths if not find_ensembles([p])]
        if singles:
            raise AnalysisError(f"{singles[0]}: not an ensemble; draw ensembles and single runs apart (or --member K)")
        figures, ens = band_figures(ensembles)
        log("ensembles: " + ", ".join(f"{e.label} ({e.path})" for e in ens))
        return _make(figures, out_dir, only, strict, log, [(e.label, str(e.path)) for e in ens])
    runs = open_runs(list(paths), log=log)
    log("models: " + ", ".join(f"{r.label} ({r.path})" for r in runs))

    cache: dict = {}

    def pca():
        if "pca" not in cache:
            from .pca import fit
            try:
                cache["pca"] = fit(runs)
            except AnalysisError as e:
                cache["pca"] = str(e)
        return cache["pca"]

    builders = _builders(runs, pca)
    figures = [(stem, title, builders[stem]) for stem, title in FIGURES]
    return _make(figures, out_dir, only, strict, log, [(r.label, str(r.path)) for r in runs])


def _make(figures: list, out_dir: str | Path, only: list[str] | None, strict: bool | None,
          log: Callable[[str], None], models: list[tuple[str, str]]) -> list:
    """Build and save each `(stem, title, builder)` wanted; write the index."""
    from train.errors import RunError

    from ..runs import AnalysisError
    from .index import Entry, write_index
    from .style import Plot, save, style

    names = {stem.split("_", 1)[1]: stem for stem, _, _ in figures}
    wanted = [names.get(name, name) for name in (only or [])]
    strict = bool(only) if strict is None else strict
    unknown = [w for w in wanted if w not in {stem for stem, _, _ in figures}]
    if unknown:
        raise AnalysisError(f"--only {unknown[0]}: no such figure (have {', '.join(names)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AnalysisError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with style():
        for stem, title, build in figures:
            if wanted and stem not in wanted:
                continue
            try:
                result = build()
            except (AnalysisError, RunError) as e:
                result = str(e)
            if isinstance(result, Plot):
                files = save(result, out_dir, stem)
                entries.append(Entry(stem, title, result.caption, files, notes=result.notes))
                log(f"wrote {files[0]} (+ .pdf, .parquet)")
                for note in result.notes:
                    log(f"  note: {note}")
            else:
                if strict:
                    raise AnalysisError(f"{stem}: cannot be made: {result}")
                entries.append(Entry(stem, title, skipped=result))
                log(f"note: {stem} skipped: {result}")
    index = write_index(out_dir, entries, models)
    log(f"wrote {index[0]} ({sum(e.skipped is None for e in entries)} figures)")
    return entries
