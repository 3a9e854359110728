# mstm — Mirror, Stage and Move.
#   make demo     install what is needed, then run a real stream on loopback
#   make test     install what is needed, then run the whole suite
#   make lint     ruff + mypy
#   make bench    benchmarks against plain rsync (not part of test)
#   make torture  the long profile of the fault-injection suite (docs/torture.md)
#   make units    render the systemd units (build/units) from units/*.in
#   make man      build the man pages (build/man) from man/*.md with pandoc
#   make install  DESTDIR= PREFIX= (commands, units, man pages, examples)
#   make uninstall  the same variables: removes what install added

PREFIX     ?= /usr/local
DESTDIR    ?=
PYTHON     ?= /usr/bin/python3
VENV       ?= .venv
BINDIR     ?= $(PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
DOCDIR     ?= $(PREFIX)/share/doc/mstm
SYSCONFDIR ?= /etc
LIBDIR     ?= $(PREFIX)/lib
PKGLIBDIR  ?= $(LIBDIR)/mstm
# Where systemd's files go depends on PREFIX, so that a local install never writes into
# the trees dpkg owns (/lib/systemd, /usr/lib/...).  PREFIX=/usr (a distribution package):
# the directories pkg-config names.  PREFIX=/usr/local (the default): the /usr/local/lib
# directories systemd 252 reads too (systemd-analyze unit-paths; sysusers.d(5),
# tmpfiles.d(5), systemd.generator(7), journalctl --update-catalog).  Any other PREFIX
# (/opt/mstm): /etc, the only other place systemd looks (the catalog has no /etc
# directory: /usr/local/lib/systemd/catalog).  Each may still be given on the command line.
ifeq ($(PREFIX),/usr)
UNITDIR     ?= $(shell pkg-config systemd --variable=systemdsystemunitdir 2>/dev/null || echo /lib/systemd/system)
GENERATORDIR ?= $(shell pkg-config systemd --variable=systemdsystemgeneratordir 2>/dev/null || echo /lib/systemd/system-generators)
SYSUSERSDIR ?= $(shell pkg-config systemd --variable=sysusersdir 2>/dev/null || echo /usr/lib/sysusers.d)
TMPFILESDIR ?= $(shell pkg-config systemd --variable=tmpfilesdir 2>/dev/null || echo /usr/lib/tmpfiles.d)
CATALOGDIR  ?= $(shell pkg-config systemd --variable=catalogdir 2>/dev/null || echo /usr/lib/systemd/catalog)
else ifeq ($(PREFIX),/usr/local)
UNITDIR     ?= /usr/local/lib/systemd/system
GENERATORDIR ?= /usr/local/lib/systemd/system-generators
SYSUSERSDIR ?= /usr/local/lib/sysusers.d
TMPFILESDIR ?= /usr/local/lib/tmpfiles.d
CATALOGDIR  ?= /usr/local/lib/systemd/catalog
else
UNITDIR     ?= $(SYSCONFDIR)/systemd/system
GENERATORDIR ?= $(SYSCONFDIR)/systemd/system-generators
SYSUSERSDIR ?= $(SYSCONFDIR)/sysusers.d
TMPFILESDIR ?= $(SYSCONFDIR)/tmpfiles.d
CATALOGDIR  ?= /usr/local/lib/systemd/catalog
endif
# Shell completion (completion/): the directories bash-completion and Debian's zsh search.
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/site-functions
# `make uninstall` stops and disables the installed units through it (a test may give
# SYSTEMCTL="systemctl --user").
SYSTEMCTL  ?= systemctl
CONFDIR     = $(SYSCONFDIR)/mstm
PANDOC     ?= pandoc
# Extra arguments for pip when installing (e.g. --no-index --find-links=DIR for offline).
PIP_INSTALL_FLAGS ?=
VERSION    := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' cmds/mstm/__init__.py)

DEB_PACKAGES = rsync openssh-client openssh-server libsystemd-dev pkg-config python3-venv \
               python3-dev gcc iproute2 iptables man-db pandoc systemd \
               prometheus-node-exporter prometheus zsh

VPY   = $(VENV)/bin/python
STAMP = $(VENV)/.installed

.PHONY: all deps demo test test-unit lint bench torture clean units man install uninstall \
        install-python install-data FORCE

all: $(STAMP) units man

# Debian packages: installed once, only when something is missing (idempotent, quick).
.deps-debian:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "mstm: need Debian packages:$$missing (run as root, or install them)"; exit 1; fi; \
	  echo "mstm: installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

$(STAMP): pyproject.toml .deps-debian
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

deps: $(STAMP)

demo: $(STAMP)
	$(VPY) demo/run_demo.py

test: $(STAMP)
	$(VPY) -m pytest -q tests

test-unit: $(STAMP)
	$(VPY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check cmds tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VPY) bench/run.py $(BENCH_ARGS)

# The fault-injection suite (docs/torture.md).  `make test` runs its short profile with
# everything else; this runs the long one (about 7 min on 2 cores; root, for the network
# namespaces and the mount namespace).  TORTURE_ITERATIONS: runs of each scenario;
# TORTURE_SECONDS: least duration of each fault phase; TORTURE_SEED: replay a run.
# Then the configuration fuzz test (tests/unit/test_config_fuzz.py) with 500 examples.
TORTURE_PROFILE    ?= long
TORTURE_ITERATIONS ?= 1
TORTURE_SECONDS    ?= 0
TORTURE_SEED       ?=
torture: $(STAMP)
	@mkdir -p build
	TORTURE_PROFILE=$(TORTURE_PROFILE) TORTURE_ITERATIONS=$(TORTURE_ITERATIONS) \
	TORTURE_SECONDS=$(TORTURE_SECONDS) TORTURE_SEED=$(TORTURE_SEED) \
	TORTURE_AUDIT_LOG=$(CURDIR)/build/torture-audit.log \
	  $(VPY) -m pytest -q tests/torture
	MSTM_FUZZ_EXAMPLES=500 $(VPY) -m pytest -q tests/unit/test_config_fuzz.py

clean:
	rm -rf build dist *.egg-info cmds/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# ---------------------------------------------------------------------------- build
# Units are rendered from units/*.in (paths filled in), man pages from man/*.md by pandoc;
# both land in build/ (removed by `make clean`).

COMMANDS   = mstm-scan mstm-send mstm-receive mstm-diskwatch mstm-alert
UNITS      = $(patsubst units/%.in,%,$(wildcard units/*.in))
MANPAGES   = $(patsubst man/%.md,%,$(wildcard man/*.[1-8].md)) mstm.conf.5
EXAMPLES   = $(wildcard conf/*.ini)
UNIT_BUILD ?= build/units
UNITS_OUT  = $(addprefix $(UNIT_BUILD)/,$(UNITS))
# The systemd generator (units/generator/, see mstm.cli.generator), rendered like the units.
GENERATOR_OUT = $(UNIT_BUILD)/generator/mstm-generator
# Shell completion, one file per command and shell (completion/README.md).
BASH_COMPLETIONS = $(addprefix completion/bash/,$(COMMANDS))
ZSH_COMPLETIONS  = $(addprefix completion/zsh/_,$(COMMANDS))
MAN_OUT    = $(addprefix build/man/,$(MANPAGES))

units: $(UNITS_OUT) $(GENERATOR_OUT)

# The rendered units depend on the values filled in: a different PREFIX (or BINDIR, ...)
# than last time renders them again.
UNIT_VARS = $(BINDIR):$(SYSCONFDIR):$(PKGLIBDIR):$(SYSUSERSDIR):$(TMPFILESDIR):$(VERSION)
$(UNIT_BUILD)/.vars: FORCE
	@mkdir -p $(@D)
	@echo '$(UNIT_VARS)' | cmp -s - $@ || echo '$(UNIT_VARS)' > $@

FORCE:

$(UNIT_BUILD)/%: units/%.in Makefile $(UNIT_BUILD)/.vars
	@mkdir -p $(@D)
	sed -e 's|@bindir@|$(BINDIR)|g' -e 's|@sysconfdir@|$(SYSCONFDIR)|g' \
	    -e 's|@pkglibdir@|$(PKGLIBDIR)|g' -e 's|@sysusersdir@|$(SYSUSERSDIR)|g' \
	    -e 's|@tmpfilesdir@|$(TMPFILESDIR)|g' -e 's|@version@|$(VERSION)|g' $< > $@.tmp
	@if grep -n '@[a-z]*@' $@.tmp; then echo "$<: placeholder left unfilled" >&2; rm -f $@.tmp; exit 1; fi
	mv $@.tmp $@

man: $(MAN_OUT)

PANDOC_MAN = $(PANDOC) --standalone --from markdown-smart --to man \
             -M footer="mstm $(VERSION)" -M header="mstm manual" -M hyphenate=false

build/man/%: man/%.md Makefile
	@mkdir -p $(@D)
	$(PANDOC_MAN) -o $@ $<

# mstm.conf(5): the settings are generated from the config package's SCHEMA, so the page can never
# disagree with the code; the prose around them is man/mstm.conf.5.md.in.
build/man/mstm.conf.5.md: man/mstm.conf.5.md.in man/gen_conf_page.py $(wildcard cmds/mstm/config/*.py)
	@mkdir -p $(@D)
	PYTHONPATH=cmds $(PYTHON) man/gen_conf_page.py $< > $@.tmp
	mv $@.tmp $@

build/man/mstm.conf.5: build/man/mstm.conf.5.md Makefile
	$(PANDOC_MAN) -o $@ $<

# ---------------------------------------------------------------------------- install
# The Python commands go into a private virtual environment, $(PKGLIBDIR), with one
# symlink per command in $(BINDIR).  Why not pip --prefix into the system Python:
# Debian marks its Python "externally managed" (PEP 668), its python3-* packages would
# mix with our pinned dependencies (click, psutil, systemd-python, inotify_simple) under
# /usr/local, and an upgrade of either could break the other.  A venv of our own is
# isolated, is removed as one directory, and its entry points are ordinary executables
# that the units name by absolute path.  A venv is relocatable except for the paths
# it writes into its scripts, so with DESTDIR those are rewritten to the final ones.
# Installing needs PyPI (or pip's cache, or PIP_INSTALL_FLAGS pointing at wheels).

install: install-python install-data
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then \
	  echo "mstm: creating user mstm and its directories, reloading systemd"; \
	  systemd-sysusers $(SYSUSERSDIR)/mstm.conf; \
	  systemd-tmpfiles --create $(TMPFILESDIR)/mstm.conf; \
	  journalctl --update-catalog; \
	  systemctl daemon-reload; \
	elif [ -z "$(DESTDIR)" ]; then \
	  echo "mstm: now run: systemd-sysusers $(SYSUSERSDIR)/mstm.conf;" \
	       "systemd-tmpfiles --create $(TMPFILESDIR)/mstm.conf;" \
	       "journalctl --update-catalog; systemctl daemon-reload"; \
	fi

install-python:
	rm -rf $(DESTDIR)$(PKGLIBDIR) build/lib build/bdist.*
	set -e; \
	dest=$$(if [ -n "$(DESTDIR)" ]; then realpath -m "$(DESTDIR)"; fi); \
	venv="$$dest$(PKGLIBDIR)"; \
	$(PYTHON) -m venv "$$venv"; \
	"$$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check \
	    $(PIP_INSTALL_FLAGS) .; \
	rm -f "$$venv"/bin/activate* "$$venv/bin/Activate.ps1"; \
	if [ -n "$$dest" ]; then \
	  for f in "$$venv"/bin/*; do \
	    if [ ! -L "$$f" ] && head -c2 "$$f" | grep -q '^#!'; then \
	      sed -i "1s|^#!$$venv/|#!$(PKGLIBDIR)/|" "$$f"; fi; \
	  done; \
	  sed -i "s| $$venv\$$| $(PKGLIBDIR)|" "$$venv/pyvenv.cfg"; \
	  "$$venv/bin/python" -m compileall -q -f -s "$$dest" -p / "$$venv/lib"; \
	else \
	  "$$venv/bin/python" -m compileall -q "$$venv/lib"; \
	fi
	install -d $(DESTDIR)$(BINDIR)
	for c in $(COMMANDS); do ln -sfn $(PKGLIBDIR)/bin/$$c $(DESTDIR)$(BINDIR)/$$c; done

install-data: units man
	install -d $(DESTDIR)$(UNITDIR)
	install -m 644 $(UNITS_OUT) $(DESTDIR)$(UNITDIR)/
	install -D -m 755 $(GENERATOR_OUT) $(DESTDIR)$(GENERATORDIR)/mstm-generator
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR)
	install -m 644 $(BASH_COMPLETIONS) $(DESTDIR)$(BASHCOMPDIR)/
	install -m 644 $(ZSH_COMPLETIONS) $(DESTDIR)$(ZSHCOMPDIR)/
	install -D -m 644 conf/mstm.sysusers $(DESTDIR)$(SYSUSERSDIR)/mstm.conf
	install -D -m 644 conf/mstm.tmpfiles $(DESTDIR)$(TMPFILESDIR)/mstm.conf
	install -D -m 644 conf/mstm.catalog $(DESTDIR)$(CATALOGDIR)/mstm.catalog
	install -D -m 644 conf/mstm.rules.yml $(DESTDIR)$(DOCDIR)/examples/mstm.rules.yml
	for p in $(MANPAGES); do \
	  install -D -m 644 build/man/$$p $(DESTDIR)$(MANDIR)/man$${p##*.}/$$p; done
# Examples: always as *.example; under their own name only where no file of that name
# exists (an admin's configuration is never overwritten).
	install -d -m 755 $(DESTDIR)$(CONFDIR)
	for f in $(EXAMPLES); do \
	  n=$$(basename $$f); install -m 644 $$f $(DESTDIR)$(CONFDIR)/$$n.example; \
	  if [ ! -e $(DESTDIR)$(CONFDIR)/$$n ]; then \
	    install -m 644 $$f $(DESTDIR)$(CONFDIR)/$$n; fi; \
	done

# Removes what `make install` put there: the venv, the command links, units, sysusers.d,
# tmpfiles.d, the journal catalog, man pages and the *.example files.  A configuration
# file stays unless it is still byte for byte the example it was installed from.  The
# user mstm and the spool (data!) stay, as with a Debian package that is removed but not
# purged.  With DESTDIR, directories left empty are removed too, up to DESTDIR itself.
# Without DESTDIR, on a host running systemd, every loaded mstm-* unit (instances and
# timers included) is stopped and disabled first, before anything is removed; if that
# fails nothing is removed.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  pick='{ for (i = 1; i <= NF; i++) if ($$i ~ /^mstm-/) { print $$i; break } }'; \
	  loaded=$$($(SYSTEMCTL) list-units --all --full --plain --no-legend 'mstm-*' | awk "$$pick") \
	    && files=$$($(SYSTEMCTL) list-unit-files --full --plain --no-legend 'mstm-*' | awk "$$pick") \
	    && { [ -z "$$loaded" ] || { echo "mstm: stopping" $$loaded; $(SYSTEMCTL) stop $$loaded; }; } \
	    && { [ -z "$$loaded$$files" ] || $(SYSTEMCTL) disable --quiet $$loaded $$files; } \
	    || { echo "mstm: could not stop and disable the mstm units; nothing was removed" \
	              "(run as root, or give SYSTEMCTL=...)" >&2; exit 1; }; \
	fi
	rm -rf $(DESTDIR)$(PKGLIBDIR)
	for c in $(COMMANDS); do \
	  [ ! -L $(DESTDIR)$(BINDIR)/$$c ] || rm -f $(DESTDIR)$(BINDIR)/$$c; done
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	rm -f $(DESTDIR)$(SYSUSERSDIR)/mstm.conf $(DESTDIR)$(TMPFILESDIR)/mstm.conf
	rm -f $(DESTDIR)$(CATALOGDIR)/mstm.catalog $(DESTDIR)$(GENERATORDIR)/mstm-generator
	rm -f $(DESTDIR)$(DOCDIR)/examples/mstm.rules.yml
	rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null || true
	rm -f $(addprefix $(DESTDIR)$(BASHCOMPDIR)/,$(COMMANDS))
	rm -f $(addprefix $(DESTDIR)$(ZSHCOMPDIR)/_,$(COMMANDS))
	for p in $(MANPAGES); do rm -f $(DESTDIR)$(MANDIR)/man$${p##*.}/$$p; done
	for f in $(EXAMPLES); do \
	  n=$(DESTDIR)$(CONFDIR)/$$(basename $$f); \
	  if [ -e $$n ] && [ -e $$n.example ] && cmp -s $$n $$n.example; then rm -f $$n; \
	  elif [ -e $$n ]; then echo "mstm: keeping $$n (changed since install)"; fi; \
	  rm -f $$n.example; \
	done
	rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || true
	@if [ -n "$(DESTDIR)" ]; then \
	  top=$$(cd "$(DESTDIR)" && pwd); \
	  for d in $(BINDIR) $(UNITDIR) $(SYSUSERSDIR) $(TMPFILESDIR) $(CATALOGDIR) $(LIBDIR) $(CONFDIR) \
	           $(GENERATORDIR) $(BASHCOMPDIR) $(ZSHCOMPDIR) $(MANDIR)/man1 $(MANDIR)/man5 $(MANDIR)/man7 $(DOCDIR); do \
	    d="$$top$$d"; \
	    while [ "$$d" != "$$top" ] && [ "$$d" != / ]; do \
	      if [ -d "$$d" ]; then rmdir "$$d" 2>/dev/null || break; fi; \
	      d=$$(dirname "$$d"); \
	    done; \
	  done; \
	elif [ -d /run/systemd/system ]; then $(SYSTEMCTL) daemon-reload; fi
