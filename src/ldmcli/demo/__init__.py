"""The bundled demo model: procedural training data, its training recipe, and image analysis.

`shapes` draws captioned images of flat shapes; `train` trains a small SD 1.x-architecture latent
diffusion model on them (`python -m ldmcli.demo.train`); `analysis` reads generated images back
(colours, position, shape) so tests can check that a picture shows what its prompt asked for.
"""
