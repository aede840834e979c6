"""LOMO in a plain DeepSpeed training loop (no Trainer): the whole API in twenty lines.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_loop.py     # CPU, gloo
    deepspeed --num_gpus 8 examples/deepspeed_loop.py                             # GPUs
"""
import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lomo_trainer import LOMO, disable_cpu_shm_build
from lomo_trainer.data import CausalLMCollator, build_datasets

disable_cpu_shm_build()  # on CPU: skip compiling an inference-only DeepSpeed op
deepspeed.init_distributed()
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

tokenizer = AutoTokenizer.from_pretrained("lomo_trainer/assets/tiny-llama")
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("lomo_trainer/assets/tiny-llama"))
train = build_datasets(tokenizer, train_file="lomo_trainer/assets/sentiment/train.jsonl", max_length=32)["train"]

# No optimizer for DeepSpeed: it only partitions the parameters (ZeRO-3); LOMO updates each rank's shard.
config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
engine, *_ = deepspeed.initialize(model=model, config=config)
optimizer = LOMO(engine, lr=0.1, clip_grad_norm=1.0)      # clip by global norm: two backward passes per step
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 200)

sampler = torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, seed=0)
loader = torch.utils.data.DataLoader(train, batch_size=16, sampler=sampler, collate_fn=CausalLMCollator(tokenizer))
device = engine.device
for step, batch in zip(range(200), loader):
    batch = {k: v.to(device) for k, v in batch.items()}
    loss = optimizer.step(lambda: engine(**batch).loss)   # the closure is the forward; LOMO runs backward+update
    scheduler.step()
    if step % 25 == 0 and rank == 0:
        print(f"step {step} loss {loss.item():.4f} grad_norm {optimizer.grad_norm:.3f} lr {scheduler.get_last_lr()[0]:.4f}")
