"""A StateFun 3.3 Python SDK function server, playground style: `example/person` keeps a
visit count per name and `example/greeter` builds the greeting, sent back to the caller.

Run: python functions.py --port 8000
"""
import argparse

from aiohttp import web
from statefun import (Context, IntType, Message, RequestReplyHandler, StatefulFunctions,
                      StringType, ValueSpec, message_builder)

functions = StatefulFunctions()


@functions.bind(typename="pygreet/person", specs=[ValueSpec(name="visits", type=IntType)])
async def person(context: Context, message: Message):
    visits = context.storage.visits or 0
    visits += 1
    context.storage.visits = visits
    context.send(message_builder(target_typename="pygreet/greeter",
                                 target_id=context.address.id,
                                 int_value=visits))
    # Remember who asked, so the greeter's answer can go back to them.
    if context.caller is not None:
        context.send(message_builder(target_typename="pygreet/greeter",
                                     target_id=context.address.id,
                                     str_value=context.caller.typename + "|" + context.caller.id))


@functions.bind(typename="pygreet/greeter", specs=[ValueSpec(name="reply_to", type=StringType),
                                                  ValueSpec(name="visits", type=IntType)])
async def greeter(context: Context, message: Message):
    if message.is_int():
        context.storage.visits = message.as_int()
    else:
        context.storage.reply_to = message.as_string()
    reply_to = context.storage.reply_to
    visits = context.storage.visits
    if reply_to and visits:
        typename, caller_id = reply_to.split("|", 1)
        context.send(message_builder(target_typename=typename, target_id=caller_id,
                                     str_value=f"Hello {context.address.id}, you are visitor #{visits}"))
        del context.storage.reply_to
        del context.storage.visits


handler = RequestReplyHandler(functions)


async def handle(request):
    req = await request.read()
    res = await handler.handle_async(req)
    return web.Response(body=res, content_type="application/octet-stream")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = web.Application()
    app.add_routes([web.post("/statefun", handle)])
    web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: print(f"serving on {args.port}", flush=True))
