import fedml, fedpgp_fedml
fedpgp_fedml.register()  # federated_optimizer: FedPGP
args = fedpgp_fedml.load_arguments("fedml_config.yaml")  # offline fedml.init()
dataset, model = fedpgp_fedml.load_data(args), fedpgp_fedml.create_model(args)
fedml.FedMLRunner(args, fedml.device.get_device(args), dataset, model).run()
