"""fedpgp-ray: FedPGP federated prompt learning on frozen CLIP, with Ray, MLflow and FedML integrations."""
__version__ = "0.1.0"
