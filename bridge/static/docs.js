// Starts Swagger UI on /docs over the bridge's own /openapi.json (a file, not inline: the CSP forbids inline scripts).
'use strict';
window.ui = window.SwaggerUIBundle({
  url: '/openapi.json',
  dom_id: '#swagger-ui',
  deepLinking: true,
  validatorUrl: null, // the default validator is an external service: offline machines, strict CSP
});
