"""The StateFun 2.0 talk's demo: a k-armed bandit model as a remote function, on the
StateFun 2.0 Python SDK (apache-flink-statefun==2.0.0), which speaks the v2 wire protocol.

`demo/model/<id>` keeps the state `arms` (count and mean reward per arm). Feature vectors
arrive through the Kafka ingress as google.protobuf.Struct {"request": id, "features": [...]};
the model picks an arm epsilon-greedy and emits the prediction, a Struct {"request": id,
"arm": n}, to the Kafka egress demo/kafka (topic "predictions") with kafka_egress_record and
pack_and_send_egress, as in the talk. Feedback, a Struct {"arm": n, "reward": r} on the same
topic, updates the arm's mean reward. A prediction request sent directly (a
google.protobuf.StringValue naming the request, e.g. an HTTP call) is answered with the arm
(a google.protobuf.Int64Value).

Run: python model.py [PORT]      (default 8000; 0 = any free port)
"""
import asyncio
import random
import sys
import typing

from aiohttp import web
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from statefun import RequestReplyHandler, StatefulFunctions, kafka_egress_record

ARMS = 4
EPSILON = 0.1

functions = StatefulFunctions()


def load_arms(context) -> Struct:
    arms = context.state("arms").unpack(Struct)
    if arms is None:
        arms = Struct()
        arms.update({"counts": [0] * ARMS, "means": [0.0] * ARMS})
    return arms


def predict(request: str, means) -> int:
    # Deterministic per request id, so runs are reproducible.
    rng = random.Random(request)
    if rng.random() < EPSILON:
        return rng.randrange(ARMS)
    return max(range(ARMS), key=lambda a: (means[a], -a))


@functions.bind("demo/model")
def model(context, message: typing.Union[StringValue, Struct]):
    arms = load_arms(context)
    counts = list(arms["counts"])
    means = list(arms["means"])
    if isinstance(message, StringValue):
        context.pack_and_reply(Int64Value(value=predict(message.value, means)))
    elif "request" in message:
        request = message["request"]
        prediction = Struct()
        prediction.update({"request": request, "arm": predict(request, means)})
        context.pack_and_send_egress("demo/kafka",
                                     kafka_egress_record(topic="predictions", key=request, value=prediction))
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
