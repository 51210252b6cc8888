"""The on-disk formats, each defined once: the same few functions per format, for every reader and writer.

- ``peft``: compact adapters as PEFT AdaLoRA directories (written by ``save_adapter``, read by
  ``read_adapter_dir``, ours and PEFT's own), and the config fields PEFT's LoRA and AdaLoRA share;
- ``state``: training state directories (checkpoints, a run's ``final/``): ``write_state`` /
  ``read_state`` of an ``AdapterState``, and the compact adapter a state holds;
- ``onnx_dir``: an exported ONNX directory (file names, manifest, kinds, the adapter-input branch
  entry and rank axes, onnxruntime-genai's config), written by both exporters, read by the runtime.

Nothing here imports the allocator, the trainer or a converter; ``onnx_dir`` imports neither torch nor
onnxruntime. Turning a path into a ``CompactAdapter``, whatever it holds, is ``adalora_export.sources``.
"""
