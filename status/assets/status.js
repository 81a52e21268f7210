// caddy-shaker status page: reloads the data in place every data-refresh
// seconds (the server renders it; this only swaps #live), and submits the
// filter form when a select changes. Nothing is loaded from elsewhere.
(function () {
	'use strict';
	var body = document.body;
	var every = Math.max(1, +body.getAttribute('data-refresh') || 5) * 1000;
	var auto = document.getElementById('auto');
	var status = document.getElementById('refresh-status');
	var form = document.getElementById('filter');
	var count = 0, timer = 0, busy = false;

	function schedule() {
		clearTimeout(timer);
		if (auto.checked) timer = setTimeout(reload, every);
	}
	function reload() {
		if (busy) return;
		busy = true;
		// the page's URL without user:password@ (which fetch refuses;
		// the browser still sends the credentials it has for the site)
		fetch(location.protocol + '//' + location.host + location.pathname + location.search, {
			headers: { 'Accept': 'text/html' },
			cache: 'no-store',
			credentials: 'same-origin'
		}).then(function (r) {
			if (!r.ok) throw new Error(r.status + ' ' + r.statusText);
			return r.text();
		}).then(function (text) {
			var doc = new DOMParser().parseFromString(text, 'text/html');
			var fresh = doc.getElementById('live');
			if (!fresh) throw new Error('no data in the answer');
			document.getElementById('live').replaceWith(document.adoptNode(fresh));
			document.title = doc.title;
			count++;
			body.setAttribute('data-refreshes', String(count));
			status.textContent = '';
		}).catch(function (e) {
			status.textContent = 'refresh failed: ' + e.message;
		}).then(function () {
			busy = false;
			schedule();
		});
	}
	auto.addEventListener('change', schedule);
	document.addEventListener('visibilitychange', function () {
		if (!document.hidden && auto.checked) reload();
	});
	Array.prototype.forEach.call(form.querySelectorAll('select'), function (s) {
		s.addEventListener('change', function () { form.submit(); });
	});
	schedule();
})();
