"""Running ray_med on a real cluster: sizing GPUs for a job, and checking the cluster files offline.

``sizing`` estimates the GPU memory a job config needs before you rent GPUs;
``kuberay`` holds a strict model of the KubeRay fields the manifests in
``cluster/kuberay`` use, renders RayService ``serveConfigV2`` from ``cluster/serve``, and
checks that the Dockerfile, the launcher configs and the manifests agree on the Ray
version, the image and token authentication. Both are plain Python: no Ray import.
"""
