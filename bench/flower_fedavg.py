"""Flower (flwr) FedAvg on the same rows as a ghx training run, for
`ghx bench train`: a Flower server and one client process per hospital on
loopback, logistic regression (or, with --hidden N, a one-hidden-layer
tanh MLP with ghx's parameter layout: hidden weights row by row, hidden
biases, output weights, bias) by the same mini-batch SGD (numpy), no
evaluation rounds. Prints one JSON document: per round the server's wall
time (configure_fit to the end of aggregate_fit), the slowest client's
fit time and the time during which some client was fitting (the union of
the fits, on the machine's monotonic clock, which every process on it
shares), plus the final weights.

Usage: python flower_fedavg.py --rounds 50 --lr 0.1 --batch 32 --epochs 1 \
           [--hidden 8] --port 18080 node1.csv node2.csv node3.csv
Each CSV holds standardised feature columns and the label (0/1) last.
"""

import argparse
import json
import multiprocessing as mp
import sys
import time

import numpy as np


def load(path):
    data = np.loadtxt(path, delimiter=",", ndmin=2)
    return data[:, :-1], data[:, -1]


def sgd(params, x, y, lr, epochs, batch, rng):
    w, b = params[:-1].copy(), float(params[-1])
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            xb = x[idx]
            p = 1.0 / (1.0 + np.exp(-(xb @ w + b)))
            err = p - y[idx]
            w -= lr * (xb.T @ err) / len(idx)
            b -= lr * err.mean()
    return np.append(w, b)


def mlp_sgd(params, x, y, lr, epochs, batch, rng, units):
    d = x.shape[1]
    W = params[:units * d].reshape(units, d).copy()
    b1 = params[units * d:units * d + units].copy()
    w2 = params[units * d + units:units * d + 2 * units].copy()
    b2 = float(params[-1])
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            xb = x[idx]
            h = np.tanh(xb @ W.T + b1)
            p = 1.0 / (1.0 + np.exp(-(h @ w2 + b2)))
            err = (p - y[idx]) / len(idx)
            dh = np.outer(err, w2) * (1.0 - h * h)
            w2 -= lr * (h.T @ err)
            b2 -= lr * err.sum()
            W -= lr * (dh.T @ xb)
            b1 -= lr * dh.sum(axis=0)
    return np.concatenate([W.ravel(), b1, w2, [b2]])


def busy(spans, lo, hi):
    """Length of the union of `spans` (start, end) within [lo, hi]."""
    total, end = 0.0, lo
    for s, e in sorted((max(s, lo), min(e, hi)) for s, e in spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def initial(dim, units):
    """Zeros for logistic regression; Glorot-uniform weights for the MLP."""
    if not units:
        return np.zeros(dim + 1)
    rng = np.random.default_rng(0)
    a = np.sqrt(6.0 / (dim + units))
    b = np.sqrt(6.0 / (units + 1))
    return np.concatenate([
        rng.uniform(-a, a, units * dim), np.zeros(units),
        rng.uniform(-b, b, units), [0.0],
    ])


def client_main(path, address, args):
    import flwr as fl

    x, y = load(path)
    rng = np.random.default_rng(abs(hash(path)) % (2**32))

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [initial(x.shape[1], args.hidden)]

        def fit(self, parameters, config):
            began = time.monotonic()
            started = time.perf_counter()
            if args.hidden:
                params = mlp_sgd(parameters[0], x, y, args.lr, args.epochs, args.batch, rng,
                                 args.hidden)
            else:
                params = sgd(parameters[0], x, y, args.lr, args.epochs, args.batch, rng)
            return [params], len(y), {
                "fit_seconds": time.perf_counter() - started,
                "fit_began": began,
                "fit_ended": time.monotonic(),
            }

        def evaluate(self, parameters, config):
            return 0.0, len(y), {}

    time.sleep(1.0)
    fl.client.start_client(server_address=address, client=Client().to_client())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=0)
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("csv", nargs="+")
    args = parser.parse_args()

    import flwr as fl
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    dim = load(args.csv[0])[0].shape[1]
    rounds = []
    final = {}

    class Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            # Round 1 would otherwise include the clients' start-up.
            client_manager.wait_for(len(args.csv))
            self.started = time.perf_counter()
            self.began = time.monotonic()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            seconds = time.perf_counter() - self.started
            local = max((r.metrics.get("fit_seconds", 0.0) for _, r in results), default=0.0)
            spans = [(r.metrics["fit_began"], r.metrics["fit_ended"]) for _, r in results]
            rounds.append({
                "round": server_round,
                "seconds": seconds,
                "local_seconds": local,
                "busy_seconds": busy(spans, self.began, time.monotonic()),
                "clients": len(results),
            })
            if out[0] is not None:
                final["weights"] = parameters_to_ndarrays(out[0])[0].tolist()
            return out

    address = f"127.0.0.1:{args.port}"
    ctx = mp.get_context("spawn")
    clients = [ctx.Process(target=client_main, args=(p, address, args)) for p in args.csv]
    for c in clients:
        c.start()
    started = time.perf_counter()
    fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=Timed(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=len(args.csv),
            min_evaluate_clients=0,
            min_available_clients=len(args.csv),
            initial_parameters=ndarrays_to_parameters([initial(dim, args.hidden)]),
        ),
    )
    total = time.perf_counter() - started
    for c in clients:
        c.join(timeout=30)
        if c.is_alive():
            c.terminate()
    json.dump({
        "flwr": fl.__version__,
        "total_seconds": total,
        "rounds": rounds,
        "weights": final.get("weights", []),
    }, sys.stdout)


if __name__ == "__main__":
    main()
