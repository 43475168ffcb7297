# Images and cluster manifests; included by the Makefile, which defines BIN and STAMP.
# images/images.env is the one place image names, bases and versions are pinned.
include images/images.env

.PHONY: images lint-images k8s-check

# Each Dockerfile gets exactly the ARGs it declares, valued from images/images.env.
build_args = $(foreach a,$(sort $(shell sed -n 's/^ARG \([A-Z_][A-Z0-9_]*\).*/\1/p' $(1))),--build-arg $(a)=$($(a)))

# The first engine that can build: docker or podman with a reachable daemon/runtime, else buildah.
# (A docker CLI without a daemon is common: `docker info` tells.)
images:
	@engine=""; \
	for e in docker podman; do \
	  if command -v $$e >/dev/null 2>&1 && $$e info >/dev/null 2>&1; then engine=$$e; break; fi; \
	done; \
	if [ -z "$$engine" ] && command -v buildah >/dev/null 2>&1; then engine=buildah; fi; \
	if [ -z "$$engine" ]; then \
	  echo "make images: no working container engine (docker or podman with a running daemon, or buildah)" >&2; exit 1; \
	fi; \
	set -x; \
	$$engine build -f images/Dockerfile.cpu $(call build_args,images/Dockerfile.cpu) -t $(CPU_IMAGE) . && \
	$$engine build -f images/Dockerfile.trainer $(call build_args,images/Dockerfile.trainer) -t $(TRAINER_IMAGE) .

lint-images: $(STAMP)
	scripts/lint_images.sh

k8s-check: $(STAMP)
	$(BIN)/python scripts/k8s_check.py
