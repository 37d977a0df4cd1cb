"""FedShufde: federated training of the autoencoder (and segmentation head) with local differential privacy
and a shuffler, on Flower. See docs/federated.md for the threat model."""
