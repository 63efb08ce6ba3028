"""Flower (flwr) FedAvg on the same rows as a ghx training run, for
`ghx bench-train`: a Flower server and one client process per hospital on
loopback, logistic regression (or, with --hidden N, a one-hidden-layer
tanh MLP with ghx's parameter layout: hidden weights row by row, hidden
biases, output weights, bias) by the same mini-batch SGD (numpy). Prints
one JSON document: per round the server's wall time (configure_fit to the
end of aggregate_fit), the slowest client's fit time and the time during
which some client was fitting (the union of the fits, on the machine's
monotonic clock, which every process on it shares), plus the final
weights.

With --holdout (one CSV per client, in the same order) every round also
gives what a ghx round gives, Flower's way: each fit reports the training
loss of the model it received, and an evaluation round (Flower's
federated evaluation, after the fit round, on the aggregated model)
reports each client's held-out log loss, accuracy and AUC. The round then
runs from configure_fit to the end of aggregate_evaluate, and its local
time is the slowest fit plus the slowest evaluation.

Usage: python flower_fedavg.py --rounds 50 --lr 0.1 --batch 32 --epochs 1 \
           [--hidden 8] --port 18080 node1.csv node2.csv node3.csv \
           [--holdout h1.csv h2.csv h3.csv]
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


def logits(params, x, units):
    """The model's logits on the rows `x`, in ghx's parameter layout."""
    if not units:
        return x @ params[:-1] + params[-1]
    d = x.shape[1]
    W = params[:units * d].reshape(units, d)
    b1 = params[units * d:units * d + units]
    w2 = params[units * d + units:units * d + 2 * units]
    return np.tanh(x @ W.T + b1) @ w2 + params[-1]


def log_loss_sum(z, y):
    """Summed log loss at logits `z`, without overflow."""
    return float(np.sum(np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z))) - y * z))


def auc(scores, y):
    """Rank (Mann-Whitney) AUC; None with one class."""
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return None
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(1, len(scores) + 1)
    return float((ranks[y > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg))


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


def client_main(path, holdout, address, args):
    import flwr as fl

    x, y = load(path)
    hx, hy = load(holdout) if holdout else (None, None)
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
            metrics = {}
            if hx is not None:
                received = parameters[0]
                metrics["train_loss"] = log_loss_sum(logits(received, x, args.hidden), y)
            metrics.update({
                "fit_seconds": time.perf_counter() - started,
                "fit_began": began,
                "fit_ended": time.monotonic(),
            })
            return [params], len(y), metrics

        def evaluate(self, parameters, config):
            if hx is None:
                return 0.0, len(y), {}
            began = time.monotonic()
            started = time.perf_counter()
            z = logits(parameters[0], hx, args.hidden)
            scores = 1.0 / (1.0 + np.exp(-z))
            loss = log_loss_sum(z, hy) / len(hy)
            metrics = {
                "accuracy": float(np.mean((scores >= 0.5) == (hy > 0.5))),
                "brier": float(np.mean((scores - hy) ** 2)),
                "eval_seconds": time.perf_counter() - started,
                "eval_began": began,
                "eval_ended": time.monotonic(),
            }
            a = auc(scores, hy)
            if a is not None:
                metrics["auc"] = a
            return loss, len(hy), metrics

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
    parser.add_argument("--holdout", nargs="+", default=[])
    parser.add_argument("csv", nargs="+")
    args = parser.parse_args()
    if args.holdout and len(args.holdout) != len(args.csv):
        parser.error("--holdout needs one CSV per client")
    evaluating = bool(args.holdout)

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
            self.local = max((r.metrics.get("fit_seconds", 0.0) for _, r in results), default=0.0)
            self.spans = [(r.metrics["fit_began"], r.metrics["fit_ended"]) for _, r in results]
            self.clients = len(results)
            if out[0] is not None:
                final["weights"] = parameters_to_ndarrays(out[0])[0].tolist()
            if evaluating:
                rows = sum(r.num_examples for _, r in results)
                self.train_loss = sum(r.metrics["train_loss"] for _, r in results) / rows
            else:
                self.close(server_round)
            return out

        def aggregate_evaluate(self, server_round, results, failures):
            out = super().aggregate_evaluate(server_round, results, failures)
            self.local += max((r.metrics.get("eval_seconds", 0.0) for _, r in results), default=0.0)
            self.spans += [(r.metrics["eval_began"], r.metrics["eval_ended"]) for _, r in results]
            rows = sum(r.num_examples for _, r in results)
            aucs = [(r.metrics["auc"], r.num_examples) for _, r in results if "auc" in r.metrics]
            self.close(server_round, {
                "train_loss": self.train_loss,
                "held_out_loss": out[0],
                "accuracy": sum(r.metrics["accuracy"] * r.num_examples for _, r in results) / rows,
                "mean_node_auc": sum(a * n for a, n in aucs) / max(sum(n for _, n in aucs), 1),
            })
            return out

        def close(self, server_round, curves=None):
            """Records the round, ended now."""
            record = {
                "round": server_round,
                "seconds": time.perf_counter() - self.started,
                "local_seconds": self.local,
                "busy_seconds": busy(self.spans, self.began, time.monotonic()),
                "clients": self.clients,
            }
            if curves:
                record["curves"] = curves
            rounds.append(record)

    address = f"127.0.0.1:{args.port}"
    ctx = mp.get_context("spawn")
    holdouts = args.holdout or [None] * len(args.csv)
    clients = [
        ctx.Process(target=client_main, args=(p, h, address, args))
        for p, h in zip(args.csv, holdouts)
    ]
    for c in clients:
        c.start()
    started = time.perf_counter()
    fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=Timed(
            fraction_fit=1.0,
            fraction_evaluate=1.0 if evaluating else 0.0,
            min_fit_clients=len(args.csv),
            min_evaluate_clients=len(args.csv) if evaluating else 0,
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
