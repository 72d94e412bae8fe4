"""The StateFun 2.0 talk's demo: a k-armed bandit model as a remote function, on the
StateFun 2.0 Python SDK (apache-flink-statefun==2.0.0), which speaks the v2 wire protocol.

`demo/model/<id>` keeps the state `arms` (count and mean reward per arm). It answers a
prediction request (a google.protobuf.StringValue naming the request) with the arm to pull
(a google.protobuf.Int64Value), epsilon-greedy; a feedback message (a google.protobuf.Struct
{"arm": n, "reward": r}) updates the arm's mean reward.

Run: python model.py [PORT]      (default 8000; 0 = any free port)
"""
import asyncio
import random
import sys
import typing

from aiohttp import web
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from statefun import RequestReplyHandler, StatefulFunctions

ARMS = 4
EPSILON = 0.1

functions = StatefulFunctions()


def load_arms(context) -> Struct:
    arms = context.state("arms").unpack(Struct)
    if arms is None:
        arms = Struct()
        arms.update({"counts": [0] * ARMS, "means": [0.0] * ARMS})
    return arms


@functions.bind("demo/model")
def model(context, message: typing.Union[StringValue, Struct]):
    arms = load_arms(context)
    counts = list(arms["counts"])
    means = list(arms["means"])
    if isinstance(message, StringValue):
        # Deterministic per request id, so runs are reproducible.
        rng = random.Random(message.value)
        if rng.random() < EPSILON:
            arm = rng.randrange(ARMS)
        else:
            arm = max(range(ARMS), key=lambda a: (means[a], -a))
        context.pack_and_reply(Int64Value(value=arm))
    else:
        arm = int(message["arm"])
        reward = float(message["reward"])
        counts[arm] += 1
        means[arm] += (reward - means[arm]) / counts[arm]
        arms.update({"counts": counts, "means": means})
        context.state("arms").pack(arms)


handler = RequestReplyHandler(functions)


async def handle(request):
    return web.Response(body=handler(await request.read()), content_type="application/octet-stream")


async def main(port):
    app = web.Application()
    app.add_routes([web.post("/statefun", handle)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"serving on {site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8000))
