"""The RAG service's request messages, built from a validated input and the caller's identity."""

from __future__ import annotations

from typing import Any

from bali_zero.rag.v1 import rag_pb2
from bridge.auth import effective_role
from bridge.inputs import ChatInput
from bridge.types import Identity

_ROLES = {"user": rag_pb2.CHAT_ROLE_USER, "assistant": rag_pb2.CHAT_ROLE_ASSISTANT, "system": rag_pb2.CHAT_ROLE_SYSTEM}


def _fields(chat: ChatInput, identity: Identity, request_id: str) -> dict[str, Any]:
    return {
        "query": chat.query,
        # A verified email wins; an anonymous caller's email is a personalisation hint only.
        "user_email": identity.email or chat.user_email or "",
        "user_role": effective_role(identity, chat.user_role) or "",
        "conversation_history": [rag_pb2.ChatMessage(role=_ROLES[r], content=c) for r, c in chat.history],
        "request_id": request_id,
    }


def stream_chat_request(chat: ChatInput, identity: Identity, request_id: str) -> rag_pb2.StreamChatRequest:
    return rag_pb2.StreamChatRequest(**_fields(chat, identity, request_id))


def chat_request(chat: ChatInput, identity: Identity, request_id: str) -> rag_pb2.ChatRequest:
    return rag_pb2.ChatRequest(**_fields(chat, identity, request_id))
