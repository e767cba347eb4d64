"""Benchmarks, not tests: each is a `vaeserve bench ...` command (benchmarks/cli.py) and prints what it measured.

    serving.py        bench serve          gRPC throughput and latency on loopback, beside a bare echo server and raw ORT
    anomaly.py        bench anomaly        ADBench AUROC/AUPRC through the exported graphs, beside IsolationForest and PCA
    fashion_mnist.py  bench fashion-mnist  conv VAE on Fashion-MNIST: test -ELBO, K-sample bound, seconds per epoch
    harness.py        a `vaeserve serve` subprocess on loopback (also used by the tests)
"""
