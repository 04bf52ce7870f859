"""Models for serving: a checkpoint's network as an ONNX file, a torch.export program (.pt2) or a folder in timm's
hub layout, each carrying the class names and the eval view, each checked against the PyTorch model before it takes
its name (models.export is the command line).

    source.py       what an export starts from: the network rebuilt from the weights, class names, eval view
    check.py        the exported model against the PyTorch one, on random inputs and on real images
    graph.py        ONNX (with ONNX Runtime, the `serve` extra) and torch.export (.pt2)
    timm_folder.py  config.json + model.safetensors that timm.create_model("local-dir:PATH") reads
"""
