"""A plain Flask app calling the LLM through Avatar Chat's execution modes (seed 001).

Run it under Gunicorn sync workers (each worker process gets one background event loop, on first use):

    AVATARCHAT_LLM__OPENAI__BASE_URL=http://127.0.0.1:11434/v1 \\
    gunicorn -w 2 -b 127.0.0.1:5000 'examples.flask_app.app:create_app()'

``POST /chat {"message": "..."}`` uses the sync facade ``chat()``; ``POST /chat-async`` is a Flask async
view awaiting ``chat_async()`` (same signature). ``POST /mode {"mode": "threads"}`` switches the mode
at run time, without a restart.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from avatarchat.config import load_settings
from avatarchat.engines.llm.base import LLMError
from avatarchat.services.llm_exec import LLMExecutor


def create_app() -> Flask:
    settings = load_settings()
    llm = LLMExecutor(settings.llm.openai, settings.services.llm, max_tokens=settings.llm.max_tokens,
                      temperature=settings.llm.temperature)
    app = Flask(__name__)
    app.extensions["llm"] = llm

    def messages() -> list[dict[str, str]] | None:
        body = request.get_json(silent=True) or {}
        text = body.get("message")
        if not isinstance(text, str) or not text.strip() or len(text) > 4000:
            return None
        return [{"role": "system", "content": settings.llm.system_prompt}, {"role": "user", "content": text}]

    @app.post("/chat")
    def chat() -> Any:
        msgs = messages()
        if msgs is None:
            return jsonify(error='send {"message": "<1-4000 characters>"}'), 400
        try:
            return jsonify(reply=llm.chat(msgs), mode=llm.mode)
        except LLMError as e:
            return jsonify(error=str(e)), 502

    @app.post("/chat-async")
    async def chat_async() -> Any:
        msgs = messages()
        if msgs is None:
            return jsonify(error='send {"message": "<1-4000 characters>"}'), 400
        try:
            return jsonify(reply=await llm.chat_async(msgs), mode=llm.mode)
        except LLMError as e:
            return jsonify(error=str(e)), 502

    @app.post("/mode")
    def mode() -> Any:
        try:
            return jsonify(llm.set_mode((request.get_json(silent=True) or {}).get("mode", "")))
        except ValueError as e:
            return jsonify(error=str(e)), 400

    @app.get("/health")
    def health() -> Any:
        return jsonify(status="ok", llm_exec=llm.status())

    return app
