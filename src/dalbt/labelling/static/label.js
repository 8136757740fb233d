// dalbt labelling page: shows the queued images one by one and posts each label as its own
// request. The page advances only after the server confirmed (committed) a label; on a network
// error the image stays and the key can simply be pressed again. Each tab keeps a stack of its
// own labels and skips (in memory) for undo; an undo is appended to the label history as a
// correction on the server and shows the image again.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const key = (it) => `${it.round}:${it.image_id}`;

  let classes = [];
  let queue = []; // pending items {image_id, round, position, path, predicted, confidence}
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
  let minSeq = 0; // state requests issued up to here are older than this tab's last undo
  const undoStack = []; // {kind: "label", label_id, item, label} | {kind: "skip", item, round}
  let showGuess = true;
  let zoom = 1; // scale of the image in its frame
  let origin = "50% 50%"; // the point the zoom is centred on
  let contrast = false; // stretch the contrast of the image
  let stretch = ""; // the current image's contrast-stretching CSS filter
  const ZOOM_MIN = 1;
  const ZOOM_MAX = 16;

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
    const undo = $("undo");
    undo.disabled = busy || !undoStack.length;
    undo.dataset.count = undoStack.length;
  }

  // -- the model's guess ------------------------------------------------------------------

  function guessOf(item) {
    return item && item.predicted != null && classes.includes(item.predicted)
      ? item.predicted : null;
  }

  function renderGuess() {
    const el = $("guess");
    const guess = guessOf(current);
    document.querySelectorAll("#classes button.guess").forEach((b) => b.classList.remove("guess"));
    el.hidden = !showGuess || !current;
    $("guess-accept").hidden = el.hidden || guess === null;
    el.classList.toggle("none", guess === null);
    if (!current) {
      el.textContent = "";
      return;
    }
    if (guess === null) {
      el.textContent = "no guess yet: cold-start round";
      return;
    }
    const conf = current.confidence == null ? ""
      : ` (${Math.round(100 * current.confidence)} %)`;
    el.textContent = `model's guess: ${guess}${conf}`;
    if (showGuess) {
      const b = document.querySelector(`#classes button[data-class="${CSS.escape(guess)}"]`);
      if (b) b.classList.add("guess");
    }
  }

  function acceptGuess() {
    const guess = showGuess ? guessOf(current) : null;
    if (guess !== null) submit("label", guess);
  }

  // -- zoom and contrast ------------------------------------------------------------------

  function renderView() {
    const img = $("image");
    img.style.transformOrigin = origin;
    img.style.transform = zoom === 1 ? "" : `scale(${zoom})`;
    img.style.filter = contrast ? stretch : "";
    $("zoom-level").textContent = `${Math.round(100 * zoom)} %`;
    $("contrast").setAttribute("aria-pressed", String(contrast));
  }

  function setZoom(z, at = null) {
    zoom = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, z));
    if (zoom === 1) origin = "50% 50%";
    else if (at) origin = at;
    renderView();
  }

  // A filter mapping the 1st..99th percentile of the image's brightness onto black..white:
  // brightness(b) then contrast(c) maps v to b*c*v + (1 - c)/2, i.e. (v - lo) / (hi - lo).
  function stretchFilter(img) {
    const fallback = "contrast(1.6) brightness(1.15)";
    try {
      const scale = Math.min(1, 256 / Math.max(img.naturalWidth, img.naturalHeight));
      const w = Math.max(1, Math.round(img.naturalWidth * scale));
      const h = Math.max(1, Math.round(img.naturalHeight * scale));
      const canvas = document.createElement("canvas");
      canvas.width = w;
      canvas.height = h;
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0, w, h);
      const px = ctx.getImageData(0, 0, w, h).data;
      const hist = new Uint32Array(256);
      for (let i = 0; i < px.length; i += 4) {
        hist[Math.round(0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2])]++;
      }
      const n = w * h;
      let lo = 0;
      let hi = 255;
      for (let acc = 0; lo < 255 && (acc += hist[lo]) <= 0.01 * n;) lo++;
      for (let acc = 0; hi > 0 && (acc += hist[hi]) <= 0.01 * n;) hi--;
      if (hi - lo < 2) return fallback; // flat image: nothing to stretch
      const l = lo / 255;
      const u = hi / 255;
      return `brightness(${(1 / (u + l)).toFixed(4)}) contrast(${((u + l) / (u - l)).toFixed(4)})`;
    } catch (e) {
      return fallback;
    }
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
    show(queue.length ? queue[0] : null);
  }

  function show(item) {
    current = item;
    loaded = false;
    const img = $("image");
    if (!current) {
      img.hidden = true;
      delete img.dataset.imageId;
      $("empty").hidden = false;
      $("filename").textContent = "";
      refreshHistory(); // a finished batch completes its batch accuracy
    } else {
      $("empty").hidden = true;
      $("filename").textContent = current.path || "";
      loadImage(current);
    }
    renderGuess();
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
      try { await img.decode(); } catch (e) { /* shown as the browser can */ }
      if (current !== item) return;
      stretch = stretchFilter(img);
      renderView();
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
        const r = await (await api("/api/skip", { image_id: item.image_id })).json();
        if (r.round !== null && r.round !== undefined) {
          undoStack.push({ kind: "skip", item, round: r.round });
        }
      } else {
        const r = await (await api("/api/label",
          { image_id: item.image_id, label, who: who() })).json();
        undoStack.push({ kind: "label", label_id: r.label_id, item, label });
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

  async function undo() {
    if (busy) return;
    const step = undoStack.pop();
    if (!step) {
      status("nothing to undo in this tab");
      setButtons();
      return;
    }
    busy = true;
    setButtons();
    const body = step.kind === "label" ? { label_id: step.label_id, who: who() }
      : { image_id: step.item.image_id, round: step.round, who: who() };
    const what = step.kind === "skip" ? "the skip"
      : `the label ${step.label === null ? "none of these classes" : step.label}`;
    const name = step.item.path || `image ${step.item.image_id}`;
    try {
      const r = await (await api("/api/undo", body)).json();
      if (step.kind === "label" && r.kind !== "none") { // an earlier label is back: not queued
        busy = false;
        const back = r.restored === null ? "none of these classes" : r.restored;
        status(`undone: ${what} of ${name}; its earlier label ${back} is back`);
        setButtons();
        refreshState();
        return;
      }
      const item = { ...step.item, round: r.round ?? step.item.round };
      handled.delete(key(item));
      handled.delete(key(step.item));
      minSeq = issued; // state answers asked for before now do not know the image is back
      queue = [item, ...queue.filter((it) => key(it) !== key(item))];
      busy = false;
      status(`undone: ${what} of ${name}; it is shown again`);
      show(item);
      refreshState();
    } catch (e) {
      busy = false;
      if (e.status === 0) {
        undoStack.push(step); // nothing happened: it can be tried again
        status(`not undone: ${e.message}; press undo again to retry`, true);
      } else {
        status(`cannot undo ${what} of ${name}: ${e.message}`, true);
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
      if (seq < applied || seq <= minSeq) return; // overtaken by a newer answer or an undo
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
    if (ev.altKey || ev.repeat) return;
    const t = ev.target;
    const typing = t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable);
    if (ev.ctrlKey || ev.metaKey) { // Ctrl+Z / Cmd+Z undo, except while typing in a field
      if (!typing && !ev.shiftKey && ev.key.toLowerCase() === "z") {
        ev.preventDefault();
        undo();
      }
      return;
    }
    if (typing) {
      if (ev.key === "Enter" && t.id === "budget") train();
      if (ev.key === "Enter" || ev.key === "Escape") t.blur();
      return;
    }
    if (classOfKey.has(ev.key)) {
      ev.preventDefault();
      submit("label", classOfKey.get(ev.key));
    } else if (ev.key === "Enter") {
      if (t && t.tagName === "BUTTON") return; // the focused button's own action
      ev.preventDefault();
      acceptGuess();
    } else if (ev.key === "s") {
      submit("skip");
    } else if (ev.key === "n") {
      submit("label", null);
    } else if (ev.key === "u") {
      undo();
    } else if (ev.key === "+" || ev.key === "=") {
      setZoom(zoom * 1.25);
    } else if (ev.key === "-" || ev.key === "_") {
      setZoom(zoom / 1.25);
    } else if (ev.key === "f") {
      setZoom(1);
    } else if (ev.key === "c") {
      contrast = !contrast;
      renderView();
    }
  });

  $("frame").addEventListener("wheel", (ev) => {
    if (!current || !loaded) return;
    ev.preventDefault();
    const box = $("frame").getBoundingClientRect();
    const at = `${(100 * (ev.clientX - box.left) / box.width).toFixed(1)}% ` +
      `${(100 * (ev.clientY - box.top) / box.height).toFixed(1)}%`;
    setZoom(zoom * (ev.deltaY < 0 ? 1.25 : 0.8), zoom === 1 ? at : null);
  }, { passive: false });

  const click = (id, action) => $(id).addEventListener("click", (ev) => {
    ev.currentTarget.blur();
    action();
  });
  click("undo", undo);
  click("zoom-in", () => setZoom(zoom * 1.25));
  click("zoom-out", () => setZoom(zoom / 1.25));
  click("zoom-reset", () => setZoom(1));
  click("contrast", () => { contrast = !contrast; renderView(); });
  try { showGuess = localStorage.getItem("dalbt.showGuess") !== "0"; } catch (e) { /* off */ }
  $("show-guess").checked = showGuess;
  $("show-guess").addEventListener("change", (ev) => {
    showGuess = ev.currentTarget.checked;
    try { localStorage.setItem("dalbt.showGuess", showGuess ? "1" : "0"); } catch (e) { /* off */ }
    ev.currentTarget.blur();
    renderGuess();
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
