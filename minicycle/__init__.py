"""minicycle: CycleGAN (Zhu et al. 2017), paper first.

Reading order. The paper:

    networks.py    the generators (ResNet, U-Net) and discriminators (PatchGAN, pixel), layer for layer as
                   the official code, so its pretrained files load
    objective.py   the losses, one term at a time, each beside its equation
    pool.py        the history of generated images the discriminators see (section 4)
    data.py        unpaired images, the official transforms, the epoch plan

The training machinery, each in a room of its own:

    model.py       one iteration: the objective minimised by the official alternation (G step, then D step)
    optim.py       Adam and the learning-rate schedules
    distributed.py data parallelism under torchrun
    cuda_graph.py  the whole iteration as one CUDA graph (--cuda_graph)
    checkpoint.py  atomic saves and the exact resume; report.py: loss_log.txt, train_opt.txt, the pages
    memory.py      the device memory a batch needs at translation (infer.py checks it before each batch)
    datasets.py    the official downloads and the built-in synthetic dataset; cli.py: the flags' one-line errors

Evaluation: fid.py (FID and KID by pytorch-fid's protocol) over inception.py (its Inception-v3).
Measuring tools, apart from what they measure: tools/ (the iteration and inference benchmark with its launch
counts, the GPU suite, infer.py's memory per megapixel).
train.py and infer.py at the top level are the scripts; the Triton kernels are in kernels/.
"""
