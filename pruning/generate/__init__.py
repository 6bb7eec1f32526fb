"""Answer generation, three ways: `hf` (transformers in this process, shared-prefix KV cache),
`vllm_engine` (a process-wide offline vLLM engine per model directory), `openai_api` (a remote
OpenAI-compatible chat endpoint as the teacher). Each gives (text, finished) per prompt."""
