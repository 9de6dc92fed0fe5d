"""Applications on top of a served model: retrieval-augmented generation, chains with memory, a tool-using agent
and chain-of-thought (see docs/rag.md).

    from lmforge.rag import RagIndex, load_embedder, load_documents, OpenAIChat, RetrievalQA
    index = RagIndex.create("runs/rag", load_embedder())          # all-MiniLM-L6-v2, FAISS on disk
    index.add_documents(load_documents("docs/"))
    qa = RetrievalQA(OpenAIChat("http://127.0.0.1:8000/v1"), index.retriever(mode="hybrid", k=4))
    answer = qa.ask("How do I install it?")                       # answer.text, answer.cited
"""
from .agent import Agent, AgentResult, Step, parse_react
from .chains import Answer, ConversationChain, RetrievalQA, Summary, qa_messages, summarize
from .chunking import Chunk, chunk_document, chunk_documents, chunk_text, simple_token_count
from .cot import CotExample, Vote, cot_messages, extract_answer, majority_vote, self_consistency
from .documents import Document, load_document, load_documents
from .embeddings import Embedder, ModelEmbedder, SentenceTransformerEmbedder, load_embedder
from .index import RagIndex
from .llm import ChatModel, ChatReply, OpenAIChat, ScriptedChat, ToolCall
from .memory import BufferMemory, SummaryMemory
from .prompts import ChatPromptTemplate, PromptTemplate
from .retrieval import BM25, Hit, Retriever, reciprocal_rank_fusion
from .stores import BACKENDS, VectorStore, open_store
from .tools import Tool, ToolError, calculate, calculator, file_reader, python_sandbox, retrieval_tool

__all__ = [
    "Agent", "AgentResult", "Step", "parse_react",
    "Answer", "ConversationChain", "RetrievalQA", "Summary", "qa_messages", "summarize",
    "Chunk", "chunk_document", "chunk_documents", "chunk_text", "simple_token_count",
    "CotExample", "Vote", "cot_messages", "extract_answer", "majority_vote", "self_consistency",
    "Document", "load_document", "load_documents",
    "Embedder", "ModelEmbedder", "SentenceTransformerEmbedder", "load_embedder",
    "RagIndex",
    "ChatModel", "ChatReply", "OpenAIChat", "ScriptedChat", "ToolCall",
    "BufferMemory", "SummaryMemory",
    "ChatPromptTemplate", "PromptTemplate",
    "BM25", "Hit", "Retriever", "reciprocal_rank_fusion",
    "BACKENDS", "VectorStore", "open_store",
    "Tool", "ToolError", "calculate", "calculator", "file_reader", "python_sandbox", "retrieval_tool",
]
