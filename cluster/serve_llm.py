# ray job submit --address http://localhost:8265 --working-dir cluster -- python serve_llm.py
"""Serve a student model with Ray Serve LLM (vLLM underneath), independently of any sweep.

The application outlives the job that deploys it (Serve applications are detached) and speaks
the OpenAI API on port 8000 of every node that runs a Serve proxy, so several sweeps can share
one student. A sweep points at it like at any vLLM endpoint:

    students:
      - {name: qwen-1.5b, model: openai/qwen-1.5b, api_base: "http://HEAD:8000/v1"}

Needs the image built with `--build-arg WITH_LLM=1` (ray[serve,llm]==2.60.0, vLLM) and a GPU
worker (cluster/ray-cluster.yaml or cluster/kuberay/raycluster.yaml). `serve run serve_llm:app`
from this folder runs it in the foreground instead; `serve shutdown` removes it. The model is
chosen with STUDENT_MODEL_ID / STUDENT_MODEL_SOURCE / STUDENT_ACCELERATOR / STUDENT_REPLICAS
(pass them with `--runtime-env-json '{"env_vars": {...}}'`; HF_TOKEN too for gated models).
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app

PORT = 8000  # the OpenAI-compatible endpoint, as for a vLLM server of our own

llm_config = LLMConfig(
    model_loading_config={
        "model_id": os.environ.get("STUDENT_MODEL_ID", "qwen-1.5b"),  # the name sweeps ask for
        "model_source": os.environ.get("STUDENT_MODEL_SOURCE", "Qwen/Qwen2.5-1.5B-Instruct"),
    },
    accelerator_type=os.environ.get("STUDENT_ACCELERATOR", "L4"),
    deployment_config={
        "autoscaling_config": {"min_replicas": 1, "max_replicas": int(os.environ.get("STUDENT_REPLICAS", "2"))},
    },
    # Sweeps send many short prompts at once: a high sequence cap keeps the GPU batched.
    engine_kwargs={"max_model_len": 8192, "max_num_seqs": 256, "gpu_memory_utilization": 0.90},
)

app = build_openai_app({"llm_configs": [llm_config]})

if __name__ == "__main__":
    serve.start(http_options={"host": "0.0.0.0", "port": PORT})
    serve.run(app, name="student", route_prefix="/", blocking=False)
    print(f"serving {llm_config.model_id} at http://<node>:{PORT}/v1 (OpenAI API); `serve shutdown` stops it")
