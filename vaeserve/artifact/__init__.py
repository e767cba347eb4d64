"""The model artifact, torch-free, read the same way by export, the service, the benchmarks and the tests:

    manifest.py     manifest.json as frozen typed dataclasses (`Manifest.from_dict` checks every key)
    repository.py   model repository folders: versions, sha256 of the graphs, scanning
    runtime.py      ONNX Runtime sessions checked against the manifest, and the version's Scorer

Dependencies run training -> export -> artifact <- service; nothing here imports export or service.
"""
