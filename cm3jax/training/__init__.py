"""The trainers of the three model families (token model, VQGAN, retriever), the one training loop they share, and what a step needs: loss, optimizer, AOT compilation, faults, progress."""
