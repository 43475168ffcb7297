# Images and cluster manifests; included by the Makefile, which defines BIN and STAMP.
# images/images.env is the one place image names, bases and versions are pinned.
include images/images.env

.PHONY: images base-image push-images run-containers test-containers lint-images k8s-check

# What `make images` built (refs tagged by commit, digests after push-images): the container runs use it.
BUILT_IMAGES := $(wildcard build/images.env)

# Both images with docker, podman or buildah (whichever works), pins from images/images.env; the
# Python base is the upstream one when it can be pulled, else bootstrapped from Debian (BASE=debian
# forces that). CA_BUNDLE / WHEELHOUSE reach the build as a secret / build context. See images/build.sh.
images:
	images/build.sh cpu trainer

# The images `make images` recorded in build/images.env, pushed; the registry's digests pinned there.
push-images:
	images/build.sh push

# The Python 3.11 base from Debian's archive alone (debootstrap; root), as PYTHON_BOOTSTRAP_IMAGE.
base-image:
	images/build.sh base

# `make run`'s demo with every task in its image, as a pod runs it (build the images first: make images).
run-containers: $(STAMP)
	KFTUNE_IMAGES=$(BUILT_IMAGES) $(BIN)/python -m pipelines.demo --runner container

lint-images: $(STAMP)
	scripts/lint_images.sh

k8s-check: $(STAMP)
	$(BIN)/python scripts/k8s_check.py

test-containers: $(STAMP)
	KFTUNE_IMAGES=$(BUILT_IMAGES) KFTUNE_CONTAINER_TESTS=1 $(BIN)/python -m pytest -m container
