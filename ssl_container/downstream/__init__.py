"""What a pretrained backbone is used for once training is done, as library code the eval apps and
the demo call: feature extraction with its cache format (``backbone_features``), the backbone as a
torchvision detection backbone (``detection_backbone``), and the PCA / attention pictures
(``visualize``). Exporting a run's weights is ``ssl_container.export``."""
