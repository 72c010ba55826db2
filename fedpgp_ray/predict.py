"""`fedpgp-ray predict`: classify images with a trained classifier, from the MLflow Model Registry or a run.

    fedpgp-ray predict --model models:/<experiment>-<config>-<dataset>-<algorithm>@newest --client 3 IMAGE...
    fedpgp-ray predict --run runs/quickstart --client 3 IMAGE...      (no MLflow store needed)
    fedpgp-ray predict ... --classes "red striped circle,blue dotted square" --top 3

Prints one line per image: its top classes with their probabilities. See docs/SERVING.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported at run time only once the arguments are checked
    from fedpgp_ray.personal_model import PersonalisedClassifier
    from fedpgp_ray.serving import PromptClassifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpgp-ray predict",
                                     description="Classify PNG/JPEG images with a trained prompt classifier.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="URI", help="an MLflow model URI: models:/<name>/<version>, "
                                                       "models:/<model id>, runs:/..., or a model folder")
    source.add_argument("--run", metavar="RUN_DIR", help="a run's output_dir: classify with its checkpoints")
    parser.add_argument("--client", type=int, metavar="ID", help="the client whose personal prompt classifies "
                                                                 "(default: the global prompt)")
    parser.add_argument("--classes", metavar="A,B,C", help="comma-separated class names to classify into "
                                                          "(default: the model's classes; novel ones work too)")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="classes shown per image (default 3)")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow store holding --model (default: "
                                                             "$MLFLOW_TRACKING_URI)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    return parser


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not any(names):
        raise ValueError("--classes is empty: give comma-separated class names, "
                         "e.g. --classes 'red circle,blue square'")
    if not all(names):
        raise ValueError(f"--classes {text!r} has an empty name: remove the extra comma")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top < 1:
            raise ValueError(f"--top {args.top}: show at least one class")
        classes = parse_classes(args.classes)
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise ValueError(f"image file not found: {', '.join(missing)}")
        if args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
        if args.model and args.model.startswith(("models:/", "runs:/")) and not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ValueError(f"--model {args.model} is looked up in an MLflow store: pass --tracking-uri (the run "
                             f"printed it, e.g. sqlite:////abs/runs/mlflow.db) or set MLFLOW_TRACKING_URI")
        import torch

        from fedpgp_ray import serving  # torch, MLflow: only once the arguments are fine
        from fedpgp_ray.personal_model import PersonalisedClassifier
        from fedpgp_ray.serving_io import check_classes, read_image_file

        if classes is not None:
            check_classes(classes, [])
        for path in args.images:  # bad files fail before the model loads; one image in memory at a time
            read_image_file(path)
        if args.model:
            classifier = load_model_classifier(args.model)
        else:
            classifier = serving.classifier_from_run(args.run, args.client)
        batch = torch.stack([classifier.clip.preprocess(read_image_file(path)) for path in args.images])
        if isinstance(classifier, PersonalisedClassifier):  # a run's model: --client picks the prompt
            client_id, names = classifier.check_request(args.client, classes)
            [(names, probs, _)] = classifier.classify(batch, [(len(batch), client_id, names)])
        else:
            if args.client is not None and args.model:
                raise ValueError(f"--client: {args.model} is one client's model already; leave --client out")
            names, probs = classifier.probabilities(batch, classes)
    except Exception as err:  # noqa: BLE001 - one line for the user; user_error says which errors are theirs
        message = user_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    top = min(args.top, len(names))
    for path, row in zip(args.images, probs):
        values, index = row.topk(top)
        shown = "  ".join(f"{names[i]} ({v:.3f})" for v, i in zip(values.tolist(), index.tolist()))
        print(f"{path}: {shown}")
    return 0


def load_model_classifier(uri: str) -> "PromptClassifier | PersonalisedClassifier":
    """The classifier inside an MLflow model (loaded with mlflow.pyfunc.load_model): a run's personalised
    model, or a one-client model (`tracking.log_client_models`)."""
    import mlflow

    from fedpgp_ray.personal_model import PersonalisedModel
    from fedpgp_ray.serving import PromptClassifierModel

    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(model, (PromptClassifierModel, PersonalisedModel)):
        raise ValueError(f"{uri} is not a fedpgp-ray classifier ({type(model).__name__})")
    return model.classifier


def user_error(err: Exception) -> str | None:
    """The one-line message for an error caused by the arguments, or None for a bug."""
    from fedpgp_ray.storage import StorageError

    mlflow_errors = sys.modules.get("mlflow.exceptions")  # loaded only if MLflow was
    if mlflow_errors is not None and isinstance(err, mlflow_errors.MlflowException):
        return (err.message.strip().splitlines() or [type(err).__name__])[0]
    # ConfigError, DataError and CheckpointError are ValueErrors
    if isinstance(err, (ValueError, FileNotFoundError, StorageError)):
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


if __name__ == "__main__":
    sys.exit(main())
