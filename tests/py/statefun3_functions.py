"""Test functions served by the real StateFun 3.3 Python SDK (apache-flink-statefun==3.3.0).

Usage: python statefun3_functions.py PORT   (0 = any free port; prints "serving on PORT")
"""
import asyncio
import sys
from datetime import timedelta

from aiohttp import web
from statefun import (Context, IntType, LongType, Message, RequestReplyHandler, StatefulFunctions,
                      StringType, ValueSpec, egress_message_builder, kafka_egress_message,
                      make_json_type, message_builder)

functions = StatefulFunctions()
EGRESS_RECORD = make_json_type(typename="io.statefun.playground/EgressRecord")


def reply(ctx: Context, **value):
    if ctx.caller is not None:
        ctx.send(message_builder(target_typename=ctx.caller.typename, target_id=ctx.caller.id, **value))


@functions.bind(typename="py/greeter", specs=[ValueSpec(name="seen", type=IntType)])
async def greeter(ctx: Context, msg: Message):
    seen = (ctx.storage.seen or 0) + 1
    ctx.storage.seen = seen
    reply(ctx, str_value=f"Hello {msg.as_string()}, you are visitor #{seen}")


@functions.bind(typename="py/counter", specs=[ValueSpec(name="total", type=LongType)])
async def counter(ctx: Context, msg: Message):
    total = (ctx.storage.total or 0) + msg.as_long()
    ctx.storage.total = total
    reply(ctx, long_value=total)


@functions.bind(typename="py/seq", specs=[ValueSpec(name="last", type=LongType), ValueSpec(name="gaps", type=LongType)])
async def seq(ctx: Context, msg: Message):
    n = msg.as_long()
    if n != (ctx.storage.last or 0) + 1:
        ctx.storage.gaps = (ctx.storage.gaps or 0) + 1
    ctx.storage.last = n
    reply(ctx, long_value=n)


@functions.bind(typename="py/ttl", specs=[
    ValueSpec(name="w", type=StringType, expire_after_write=timedelta(seconds=1)),
    ValueSpec(name="i", type=IntType, expire_after_call=timedelta(seconds=1))])
async def ttl(ctx: Context, msg: Message):
    previous = ctx.storage.w or ""
    calls = (ctx.storage.i or 0) + 1
    ctx.storage.i = calls
    if msg.as_string() != "peek":
        ctx.storage.w = msg.as_string()
    reply(ctx, str_value=f"{previous}|{calls}")


@functions.bind(typename="py/timer", specs=[ValueSpec(name="fired", type=IntType)])
async def timer(ctx: Context, msg: Message):
    cmd = msg.as_string()
    token = "tok-" + ctx.address.id
    if cmd == "schedule":
        ctx.send_after(timedelta(milliseconds=400),
                       message_builder(target_typename="py/timer", target_id=ctx.address.id, str_value="fire"),
                       cancellation_token=token)
    elif cmd == "cancel":
        ctx.cancel_delayed_message(token)
    elif cmd == "fire":
        ctx.storage.fired = (ctx.storage.fired or 0) + 1
    reply(ctx, int_value=ctx.storage.fired or 0)


@functions.bind(typename="py/egress", specs=[])
async def egress(ctx: Context, msg: Message):
    ctx.send_egress(egress_message_builder(target_typename="io.statefun.playground/egress",
                                           value={"topic": "greetings", "payload": "hi " + msg.as_string()},
                                           value_type=EGRESS_RECORD))


@functions.bind(typename="py/kafka-echo", specs=[ValueSpec(name="n", type=LongType)])
async def kafka_echo(ctx: Context, msg: Message):
    # A word from a Kafka ingress, answered into the Kafka egress test/out (topic "out"),
    # keyed by the address id, numbered per id.
    n = (ctx.storage.n or 0) + 1
    ctx.storage.n = n
    ctx.send_egress(kafka_egress_message(typename="test/out", topic="out", key=ctx.address.id,
                                         value=f"{ctx.address.id}:{msg.as_string()}:{n}"))


@functions.bind(typename="py/slow", specs=[ValueSpec(name="n", type=LongType)])
async def slow(ctx: Context, msg: Message):
    await asyncio.sleep(0.002)
    ctx.storage.n = (ctx.storage.n or 0) + 1
    reply(ctx, long_value=ctx.storage.n)


@functions.bind(typename="py/slower", specs=[ValueSpec(name="n", type=LongType)])
async def slower(ctx: Context, msg: Message):
    """A function a backlog builds up behind (10 ms a message)."""
    await asyncio.sleep(0.01)
    ctx.storage.n = (ctx.storage.n or 0) + 1


SMOKE = make_json_type(typename="statemesh.smoke/Commands")


@functions.bind(typename="statemesh.smoke/py",
                specs=[ValueSpec(name="count", type=LongType), ValueSpec(name="log", type=StringType),
                       ValueSpec(name="pad", type=StringType)])
async def smoke(ctx: Context, msg: Message):
    """The crash test's command interpreter (the same as examples/embedded/src/smoke.rs)."""
    doc = msg.as_type(SMOKE)
    if doc.get("id") is not None:
        ctx.storage.log = (ctx.storage.log or "") + doc["id"] + " "
    for c in doc["cmds"]:
        (op, arg), = c.items()
        if op == "inc":
            ctx.storage.count = (ctx.storage.count or 0) + arg
        elif op in ("send", "delay"):
            ns, typ, id_ = arg["to"].split("/", 2)
            body = {"cmds": arg["cmds"]}
            if arg.get("id") is not None:
                body["id"] = arg["id"]
            m = message_builder(target_typename=f"{ns}/{typ}", target_id=id_, value=body, value_type=SMOKE)
            if op == "send":
                ctx.send(m)
            else:
                ctx.send_after(timedelta(milliseconds=arg["ms"]), m, cancellation_token=arg.get("token") or "")
        elif op == "cancel":
            ctx.cancel_delayed_message(arg)
        elif op == "egress":
            ctx.send_egress(egress_message_builder(target_typename="statemesh/smoke", value=arg, value_type=StringType))
        elif op == "pad":
            ctx.storage.pad = "p" * arg
        elif op == "reply":
            reply(ctx, str_value=arg)
        else:
            raise ValueError(f"unknown smoke command {op}")


handler = RequestReplyHandler(functions)


async def handle(request):
    res = await handler.handle_async(await request.read())
    return web.Response(body=res, content_type="application/octet-stream")


async def main(port):
    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.post("/statefun", handle)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"serving on {site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
