"""Analyses of finished runs. In Python:

    from analysis import Run
    run = Run("runs/quickstart/...")
    run.steps                       # checkpoint steps
    run.metrics("heads")            # per-step, per-head scores as a DataFrame (also "train", "eval")
    for step, model in run.models():  # every checkpoint's model, loaded lazily
        ...
    run.tl_model(run.steps[-1])     # in TransformerLens: a 4.x TransformerBridge (3.x: HookedTransformer)

On the command line: `python -m analysis --help`.
"""


def __getattr__(name: str):
    # Lazy, so `python -m analysis --help` does not import torch.
    if name == "Run":
        from .runs import Run

        return Run
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
