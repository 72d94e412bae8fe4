"""The StateFun playground's Python greeter, unmodified in spirit, on the StateFun 3.3 SDK.

`example/person` counts visits per name and asks `example/greeter` for a greeting, which goes
to the playground egress topic `greetings` (and, for `statemesh call`, back to the caller).

Run: python functions.py [PORT]      (default 8000; 0 = any free port)
"""
import asyncio
import sys

from aiohttp import web
from statefun import (Context, IntType, Message, RequestReplyHandler, StatefulFunctions, ValueSpec,
                      egress_message_builder, make_json_type, message_builder)

functions = StatefulFunctions()

GREET_REQUEST_TYPE = make_json_type(typename="example/GreetRequest")
EGRESS_RECORD_TYPE = make_json_type(typename="io.statefun.playground/EgressRecord")


@functions.bind(typename="example/person", specs=[ValueSpec(name="visits", type=IntType)])
async def person(context: Context, message: Message):
    request = message.as_type(GREET_REQUEST_TYPE)
    visits = (context.storage.visits or 0) + 1
    context.storage.visits = visits
    request["visits"] = visits
    if context.caller is not None:
        request["reply_to"] = [context.caller.typename, context.caller.id]
    context.send(message_builder(target_typename="example/greeter", target_id=request["name"],
                                 value=request, value_type=GREET_REQUEST_TYPE))


@functions.bind(typename="example/greeter")
async def greeter(context: Context, message: Message):
    request = message.as_type(GREET_REQUEST_TYPE)
    name, visits = request["name"], request["visits"]
    if visits == 1:
        greeting = f"Hello {name}! Nice to meet you!"
    else:
        greeting = f"Hello {name}! Nice to see you again, visit #{visits}."
    context.send_egress(egress_message_builder(target_typename="io.statefun.playground/egress",
                                               value={"topic": "greetings", "payload": greeting},
                                               value_type=EGRESS_RECORD_TYPE))
    if "reply_to" in request:
        typename, caller_id = request["reply_to"]
        context.send(message_builder(target_typename=typename, target_id=caller_id, str_value=greeting))


handler = RequestReplyHandler(functions)


async def handle(request):
    res = await handler.handle_async(await request.read())
    return web.Response(body=res, content_type="application/octet-stream")


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
