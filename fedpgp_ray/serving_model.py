"""The MLflow "model from code" file of fedpgp-ray's classifiers (see fedpgp_ray/serving.py).

MLflow copies this file into every logged model and runs it at load time, instead of unpickling
a Python object: the model's artifacts and model_config then go to `load_context`.
"""
from mlflow.models import set_model

from fedpgp_ray.serving import PromptClassifierModel

set_model(PromptClassifierModel())
