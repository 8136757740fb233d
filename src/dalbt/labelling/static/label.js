// dalbt labelling page: shows the queued images one by one and posts each label as its own
// request. The page advances only after the server confirmed (committed) a label; on a network
// error the image stays and the key can simply be pressed again.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const key = (it) => `${it.round}:${it.image_id}`;

  let classes = [];
  let queue = []; // pending items {image_id, round, position}, in server order
  let batches = {}; // round -> {size, pending}
  let current = null; // item on screen
  let loaded = false; // its image is visible (no label before the person has seen it)
  let busy = false; // a label or skip request is in flight
  const handled = new Set(); // items this tab labelled or skipped (server confirmed)
  let issued = 0; // /api/state requests sent
  let applied = 0; // newest one applied
  let awaitSeq = 0; // a query this tab started: first state request that can see its end
  let wasRunning = false;
  let nRounds = -1;
  let budgetTouched = false;
  let whoSet = false;
  let imageUrl = null;

  class HttpError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(path, body) {
    const opts = { credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers = { "Content-Type": "application/json" };
      opts.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, opts);
    } catch (e) {
      throw new HttpError(0, "the server cannot be reached (network error)");
    }
    if (!r.ok) {
      let detail = `${r.status} ${r.statusText}`;
      try {
        const j = await r.json();
        detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
      } catch (e) { /* not JSON */ }
      throw new HttpError(r.status, detail);
    }
    return r;
  }

  function say(id, text, error = false) {
    const el = $(id);
    el.textContent = text;
    el.classList.toggle("error", error);
  }
  const status = (text, error = false) => say("status", text, error);
  const queryStatus = (text, error = false) => say("query-status", text, error);

  function who() {
    return $("who").value.trim();
  }

  // Keys 1..9 and 0 pick the first ten classes in order; but when every class is named by a
  // single digit (0..9, as digits or MNIST), each digit key picks the class of that name.
  const keyOfClass = new Map();
  const classOfKey = new Map();

  function buildButtons() {
    const byName = classes.every((c) => /^[0-9]$/.test(c));
    classes.forEach((name, i) => {
      const k = byName ? name : (i < 10 ? String((i + 1) % 10) : null);
      if (k !== null) {
        keyOfClass.set(name, k);
        classOfKey.set(k, name);
      }
    });
    const box = $("classes");
    box.textContent = "";
    for (const name of classes) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.class = name;
      b.textContent = name;
      const k = keyOfClass.get(name);
      if (k !== undefined) {
        const kbd = document.createElement("kbd");
        kbd.textContent = k;
        b.append(" ", kbd);
        b.title = `key ${k}`;
      }
      b.addEventListener("click", () => { b.blur(); submit("label", name); });
      box.append(b);
    }
  }

  function setButtons() {
    const off = busy || !current || !loaded;
    document.querySelectorAll("#classes button, #skip, #ood").forEach((b) => { b.disabled = off; });
  }

  function renderProgress() {
    const p = $("progress");
    if (current) {
      const left = queue.filter((it) => it.round === current.round).length;
      const b = batches[current.round];
      const size = b ? Math.max(b.size, left) : left;
      p.textContent = `${size - left + 1} / ${size} in round ${current.round}`;
      p.dataset.round = current.round;
    } else {
      p.textContent = nRounds > 0 ? "queue empty" : "no images queued yet";
      delete p.dataset.round;
    }
  }

  function renderTotals(pr) {
    $("totals").textContent = `${pr.labelled} of ${pr.images} images labelled` +
      (pr.ood ? `, ${pr.ood} as none of these classes` : "") +
      (pr.problems ? `; ${pr.problems} unusable (changed, missing or unreadable)` : "");
    const table = $("counts");
    table.textContent = "";
    for (const [name, n] of Object.entries(pr.per_class)) {
      const row = table.insertRow();
      row.insertCell().textContent = name;
      const c = row.insertCell();
      c.textContent = n;
      c.dataset.count = name;
    }
  }

  function refreshHistory() {
    $("history").src = `/api/history.png?t=${Date.now()}`;
  }

  function showNext() {
    current = queue.length ? queue[0] : null;
    loaded = false;
    const img = $("image");
    if (!current) {
      img.hidden = true;
      delete img.dataset.imageId;
      $("empty").hidden = false;
      refreshHistory(); // a finished batch completes its batch accuracy
    } else {
      $("empty").hidden = true;
      loadImage(current);
    }
    renderProgress();
    setButtons();
  }

  async function loadImage(item) {
    try {
      const r = await api(`/api/image/${item.image_id}`);
      const blob = await r.blob();
      if (current !== item) return;
      if (imageUrl) URL.revokeObjectURL(imageUrl);
      imageUrl = URL.createObjectURL(blob);
      const img = $("image");
      img.src = imageUrl;
      img.dataset.imageId = item.image_id;
      img.hidden = false;
      loaded = true;
      setButtons();
    } catch (e) {
      if (current !== item) return;
      if (e.status === 409 || e.status === 404) { // changed on disk, unreadable or gone
        status(`skipped: ${e.message}`, true);
        handled.add(key(item));
        queue = queue.filter((it) => key(it) !== key(item));
        showNext();
        refreshState();
      } else {
        status(`cannot load the image: ${e.message}; retrying in 3 s`, true);
        setTimeout(() => { if (current === item && !loaded) loadImage(item); }, 3000);
      }
    }
  }

  async function submit(kind, label) {
    if (busy || !current || !loaded) return;
    const item = current;
    busy = true;
    setButtons();
    try {
      if (kind === "skip") {
        await api("/api/skip", { image_id: item.image_id });
      } else {
        await api("/api/label", { image_id: item.image_id, label, who: who() });
      }
      handled.add(key(item));
      queue = queue.filter((it) => key(it) !== key(item));
      status(kind === "skip" ? "skipped (it goes back to the pool)"
        : `saved: ${label === null ? "none of these classes" : label}`);
      busy = false;
      showNext();
      refreshState();
    } catch (e) {
      busy = false;
      if (e.status === 0) {
        status(`not saved: ${e.message}. The image stays; press the key again to retry.`, true);
      } else {
        status(`not saved: ${e.message}`, true);
      }
      setButtons();
    }
  }

  function applyState(s, seq) {
    if (!classes.length) {
      classes = s.classes;
      buildButtons();
    }
    if (!whoSet) {
      let saved = null;
      try { saved = localStorage.getItem("dalbt.who"); } catch (e) { /* storage off */ }
      $("who").value = saved || s.user;
      whoSet = true;
    }
    if (!budgetTouched) $("budget").value = s.budget;
    batches = s.batches;
    queue = s.pending.filter((it) => !handled.has(key(it)));
    renderTotals(s.progress);
    if (nRounds !== -1 && s.rounds.length !== nRounds) refreshHistory();
    nRounds = s.rounds.length;

    const q = s.query;
    renderRunning(q);
    $("train").disabled = q.running;
    if (awaitSeq && seq >= awaitSeq && !q.running) { // the query this tab started is over
      awaitSeq = 0;
      if (q.error) {
        queryStatus(`query failed: ${q.error}`, true);
      } else if (q.last) {
        const acc = q.last.val_acc === null ? ""
          : `, validation accuracy ${(100 * q.last.val_acc).toFixed(1)} %`;
        const images = [
          q.last.skipped_images ? `${q.last.skipped_images} unusable images left out` : "",
          q.last.restored_images ? `${q.last.restored_images} restored images back` : "",
        ].filter(Boolean).join(", ");
        queryStatus(`round ${q.last.round}: queued ${q.last.queued} images ` +
          `(trained on ${q.last.n_labelled} labels${acc})` + (images ? `; ${images}` : ""));
      }
      refreshHistory();
    } else if (wasRunning && !q.running) {
      refreshHistory();
    }
    wasRunning = q.running;

    if (current && !busy && !queue.some((it) => key(it) === key(current))) {
      status("this image was labelled or skipped elsewhere; moved on");
      current = null;
    }
    if (!current && !busy) {
      if (queue.length) showNext();
      else if (!$("image").hidden || $("empty").hidden) showNext();
    }
    renderProgress();
  }

  async function refreshState() {
    const seq = ++issued;
    try {
      const s = await (await api("/api/state")).json();
      if (seq < applied) return; // an older answer overtaken by a newer one
      applied = seq;
      applyState(s, seq);
      return s;
    } catch (e) {
      if (seq >= applied) status(`cannot reach the server: ${e.message}; retrying`, true);
      return null;
    }
  }

  // The running query: a bar of its phase's units done (indeterminate while the total is
  // unknown) and the server's line, e.g. "training: step 120 / 600, loss 0.412, about 14 s left".
  function renderRunning(q) {
    $("running").hidden = !q.running;
    const p = q.running ? q.progress : null;
    const bar = $("query-progress");
    if (p && p.total > 0) {
      bar.max = p.total;
      bar.value = Math.min(p.done, p.total);
    } else {
      bar.removeAttribute("value");
    }
    bar.dataset.phase = p ? p.phase : "";
    $("query-phase").textContent = p ? p.text : "starting: reading the images\u2026";
  }

  async function train() {
    const n = parseInt($("budget").value, 10);
    if (!(n > 0)) {
      queryStatus("enter a positive number of images to queue", true);
      return;
    }
    $("train").disabled = true;
    try {
      await api("/api/query", { budget: n });
      awaitSeq = issued + 1;
      renderRunning({ running: true, progress: null });
      queryStatus("");
    } catch (e) {
      queryStatus(e.status === 409 ? e.message : `could not start the query: ${e.message}`, true);
      $("train").disabled = false;
    }
    refreshState();
  }

  async function poll() {
    const s = await refreshState();
    const fast = awaitSeq || (s && s.query.running);
    setTimeout(poll, fast ? 1000 : 4000);
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) return;
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) {
      if (ev.key === "Enter" && t.id === "budget") train();
      if (ev.key === "Enter" || ev.key === "Escape") t.blur();
      return;
    }
    if (classOfKey.has(ev.key)) {
      ev.preventDefault();
      submit("label", classOfKey.get(ev.key));
    } else if (ev.key === "s") {
      submit("skip");
    } else if (ev.key === "n") {
      submit("label", null);
    }
  });

  $("skip").addEventListener("click", (ev) => { ev.currentTarget.blur(); submit("skip"); });
  $("ood").addEventListener("click", (ev) => { ev.currentTarget.blur(); submit("label", null); });
  $("train").addEventListener("click", (ev) => { ev.currentTarget.blur(); train(); });
  $("budget").addEventListener("input", () => { budgetTouched = true; });
  $("who").addEventListener("change", () => {
    try { localStorage.setItem("dalbt.who", who()); } catch (e) { /* storage off */ }
  });

  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname); // the cookie holds it now
  }
  setButtons();
  poll();
})();
