"""Networks: the EDM-preconditioned U-Net and the manifold feature map."""
