"""The MLflow "model from code" file of a run's personalised model (see fedpgp_ray/personal_model.py).

MLflow copies this file into the logged model and runs it at load time, instead of unpickling a
Python object: the model's artifacts then go to `load_context`.
"""
from mlflow.models import set_model

from fedpgp_ray.personal_model import PersonalisedModel

set_model(PersonalisedModel())
